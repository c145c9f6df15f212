"""File formats: safetensors and PyTorch checkpoints, read without torch."""
