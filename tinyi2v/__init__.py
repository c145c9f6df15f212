"""tinyi2v: MobileI2V image-to-video inference with numpy alone.

    import tinyi2v
    pipe = tinyi2v.Pipeline.load("my-model")     # photo -> frames [T, H, W, 3] uint8
    frames = pipe("photo.jpg", seed=0)
    f = tinyi2v.load_denoiser("my-model")        # or its transformer/ folder
    v = f(x, timestep, cond_mask, flow_score)    # the official denoiser's call

Kernels: `TINYI2V_BACKEND=auto|numpy|numba` (numba optional, imported on first use).
"""
import os

# OpenBLAS's threads spin for up to ~2^28 cycles (~0.1 s) after each matrix product before they
# sleep, holding the cores that the next kernel's threads need: on 2 cores that made a numba
# kernel right after a GEMM 2-3x slower. 4 (the minimum) makes them sleep at once; waking them
# costs microseconds per GEMM. It takes effect only if numpy is not imported yet (the CLI, a
# script that imports tinyi2v first); a value set by the user wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .denoiser import Denoiser, load_denoiser
from .errors import FormatError, TinyI2VError
from .pipeline import Pipeline
from .vae import load_vae

__all__ = ["Denoiser", "FormatError", "Pipeline", "TinyI2VError", "load_denoiser", "load_vae"]
__version__ = "0.1.0"
