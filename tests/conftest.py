"""Shared test helpers: fixture paths and tiny random models."""
from __future__ import annotations

import os
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


def random_denoiser_params(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor of `cfg`, scaled like the official fixture."""
    from tinyi2v.denoiser import param_shapes

    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(("scale_shift_table",)):
            a = rng.normal(0, 0.2, shape)
        elif name.endswith("norm.weight"):
            a = 1 + rng.normal(0, 0.2, shape)
        elif name.endswith("bias"):
            a = rng.normal(0, 0.1, shape)
        else:
            a = rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[1:]))
        params[name] = a.astype(np.float32)
    return params
