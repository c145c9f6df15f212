"""Shared test helpers: fixture paths and tiny random models."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OFFICIAL = SHARED / "fixtures" / "mobiledit-official"


def need(path: Path) -> Path:
    """The reference material beside the checkout (../shared). Missing: a skip on a developer's
    machine, a failure in CI (CI=true), so parity tests can never pass by not running."""
    if not path.exists():
        message = f"reference material not found: {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def random_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors for `shapes`, scaled like the official fixtures: kernels
    N(0, 1/fan_in), biases N(0, 0.01), norm gains 1 + N(0, 0.04), modulation tables N(0, 0.04)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        if name.endswith("scale_shift_table"):
            a = rng.normal(0, 0.2, shape)
        elif re.search(r"norm\d*\.weight$", name):
            a = 1 + rng.normal(0, 0.2, shape)
        elif name.endswith("bias"):
            a = rng.normal(0, 0.1, shape)
        else:
            a = rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[1:]))
        params[name] = a.astype(np.float32)
    return params


def random_denoiser_params(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    from tinyi2v.denoiser import param_shapes

    return random_params(param_shapes(cfg), seed)


def softmax_block_case(seed: int = 0) -> tuple[dict, dict[str, np.ndarray], tuple]:
    """A one-block denoiser whose block is softmax attention (hidden 144: 2 heads of 72), for
    `softmax_attention_block` tests: (config, params, RoPE tables of a 3x4x5 grid, N = 60)."""
    from tinyi2v.denoiser import official_config, rope_tables

    cfg = official_config(in_channels=8, hidden_size=144, num_blocks=1, softmax_blocks=(0,),
                          mlp_hidden_size=48)
    rope = rope_tables(3, 4, 5, 72, cfg["rope_scales"], cfg["rope_theta"])
    return cfg, random_denoiser_params(cfg, seed), rope


def make_tiny_model(root: Path, seed: int = 0, scheduler: dict | None = None) -> Path:
    """A complete model folder with random weights (never a trained model): a tiny MobileI2V
    denoiser over the tiny LTX VAE fixture's 8-channel latents, 64x96 pixels, 9 frames."""
    import json
    import shutil

    from tinyi2v.denoiser import official_config
    from tinyi2v.weights import save_component, save_model_index

    vae = need(SHARED / "fixtures" / "ltx-vae-tiny")
    cfg = official_config(in_channels=8, hidden_size=72, num_blocks=2, softmax_blocks=(1,),
                          mlp_hidden_size=24, freq_dim=32)
    save_component(root / "transformer", cfg, random_denoiser_params(cfg, seed))
    (root / "vae").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(vae / name, root / "vae" / name)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        scheduler or {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                      "num_inference_steps": 3, "num_train_timesteps": 1000}))
    save_model_index(root, {"transformer": ["tinyi2v", "MobileI2VTransformer"],
                            "vae": ["diffusers", "AutoencoderKLLTXVideo"],
                            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
                     {"height": 64, "width": 96, "frames": 9, "fps": 8, "motion": 2.0})
    return root
