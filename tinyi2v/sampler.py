"""Flow-matching Euler sampler, as MobileI2V samples (spec §6, §7).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma * noise, and the denoiser predicts the
velocity v = noise - x0. Walking sigma from 1 down to 0 with Euler steps
x <- x + (sigma_next - sigma) v turns noise into a clip. The guide image enters only as
latent frame 0, written before and after every step, with its tokens marked by cond_mask
(the denoiser gives them timestep 0).

A schedule is an explicit sigma list ending in 0: the official 30-step shift-3 schedule, or the
list a distilled model ships in its scheduler config (e.g. 2 steps).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from .errors import TinyI2VError

Denoise = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# progress(stage, step, total, elapsed_seconds)
Progress = Callable[[str, int, int, float], None]


def shifted_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000
                   ) -> np.ndarray:
    """The schedule of diffusers' FlowMatchEulerDiscreteScheduler(shift) used upstream.

    num_steps points evenly spaced from 1 to the smallest trained sigma (itself shifted),
    then sigma <- shift sigma / (1 + (shift - 1) sigma), then a final 0. [num_steps + 1] float32.
    """
    if num_steps < 1:
        raise TinyI2VError(f"steps must be at least 1, got {num_steps}")

    def shifted(s):
        return shift * s / (1.0 + (shift - 1.0) * s)

    sigma_min = shifted(1.0 / num_train_timesteps)
    sigmas = shifted(np.linspace(1.0, sigma_min, num_steps))
    return np.append(sigmas, 0.0).astype(np.float32)


def schedule_from_config(config: dict, num_steps: int | None = None) -> np.ndarray:
    """The model's own schedule (scheduler_config.json), or `num_steps` shifted steps."""
    if num_steps is None and config.get("sigmas"):
        sigmas = np.asarray(config["sigmas"], dtype=np.float32)
        if sigmas[-1] != 0.0:
            sigmas = np.append(sigmas, np.float32(0.0))
        return check_sigmas(sigmas)
    steps = num_steps or int(config.get("num_inference_steps", 30))
    return shifted_sigmas(steps, float(config.get("shift", 3.0)),
                          int(config.get("num_train_timesteps", 1000)))


def check_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    s = np.asarray(sigmas, dtype=np.float32)
    if s.ndim != 1 or len(s) < 2 or s[-1] != 0.0 or np.any(np.diff(s) >= 0) or s[0] > 1.0:
        raise TinyI2VError(f"a schedule must decrease strictly from at most 1 to 0, got {s.tolist()}")
    return s


def guide_mask(latent_shape: tuple[int, ...]) -> np.ndarray:
    """cond_mask [1, N]: 1.0 on the tokens of latent frame 0 (the guide image), else 0."""
    _, _, T, H, W = latent_shape
    mask = np.zeros((1, T * H * W), dtype=np.float32)
    mask[:, :H * W] = 1.0
    return mask


def sample(denoise: Denoise, noise: np.ndarray, guide: np.ndarray, sigmas: Sequence[float],
           flow_score: float, progress: Progress | None = None) -> np.ndarray:
    """Euler-integrate from noise to a latent clip whose frame 0 is the guide.

    noise [B, C, T, H, W]; guide [B, C, 1, H, W] (the VAE latent of the image);
    sigmas from 1 to 0 (len steps + 1). Returns the latent [B, C, T, H, W].
    """
    sigmas = check_sigmas(sigmas)
    x = noise.astype(np.float32, copy=True)
    B = x.shape[0]
    mask = guide_mask(x.shape)
    flow = np.full(B, flow_score, dtype=np.float32)
    total, start = len(sigmas) - 1, time.perf_counter()
    for i in range(total):
        x[:, :, :1] = guide
        v = denoise(x, np.full(B, 1000.0 * sigmas[i], dtype=np.float32), mask, flow)
        x += (sigmas[i + 1] - sigmas[i]) * v
        x[:, :, :1] = guide
        if progress:
            progress("denoise", i + 1, total, time.perf_counter() - start)
    return x
