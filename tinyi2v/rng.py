"""Gaussian noise that is the same on every platform and numpy version for a given seed.

numpy promises a stable PCG64 bit stream, but not a stable `standard_normal` algorithm across
versions. So we take raw 64-bit words from PCG64 and apply Box-Muller ourselves, in float64,
rounding to float32 at the end: the same seed gives the same clip on a laptop, an ARM board or
in Pyodide (up to libm's last-bit differences in log/cos/sin, which the float32 rounding hides
in all but vanishingly rare cases).
"""
from __future__ import annotations

import numpy as np


def gaussian_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 array of `shape`, a pure function of (seed, shape)."""
    n = int(np.prod(shape))
    words = np.random.PCG64(seed).random_raw(2 * ((n + 1) // 2))   # uint64
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53   # 53-bit uniforms in [0, 1)
    u1, u2 = 1.0 - u[0::2], u[1::2]                                # u1 in (0, 1]: log is finite
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return z.astype(np.float32).reshape(shape)
