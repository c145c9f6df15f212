"""Kernels behind one switch: `TINYI2V_BACKEND=auto|numpy|numba` (or `set_backend`).

`auto` uses numba when it can be imported and numpy otherwise. numba is imported only when a
kernel is first used, so `import tinyi2v` and `tinyi2v --help` never pay for it.
`TINYI2V_THREADS=n` caps the threads of numba's parallel loops (at most NUMBA_NUM_THREADS, by
default the number of cores); BLAS reads its own count (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS)
once, when numpy starts, so set those in the environment too. Results do not depend on it.
Usage: `from tinyi2v import ops; ops.layernorm_modulate(...)`. The signatures and the
reference maths are documented in `numpy_ops.py`.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from ..errors import TinyI2VError

KERNELS = ("to_float32", "layernorm_modulate", "gated_add_", "rope3d", "qk_norm_rope",
           "linear_attention", "depthwise_silu_gate", "bias_silu_", "pixel_norm",
           "winograd_tiles", "winograd_untile")
BACKENDS = ("auto", "numpy", "numba")

_active: ModuleType | None = None


def set_backend(name: str | None = None) -> str:
    """Select the kernel backend (default: $TINYI2V_BACKEND or auto); returns 'numpy' or 'numba'."""
    global _active
    name = (name or os.environ.get("TINYI2V_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise TinyI2VError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "numba"):
        try:
            _active = importlib.import_module(f"{__name__}.numba_ops")
            _set_numba_threads()
            return "numba"
        except ImportError as e:
            if name == "numba":
                raise TinyI2VError(f"backend 'numba' requested but numba cannot be imported ({e}); "
                                   "install it with: pip install 'tinyi2v[fast]'") from None
    _active = importlib.import_module(f"{__name__}.numpy_ops")
    return "numpy"


def _set_numba_threads() -> None:
    value = os.environ.get("TINYI2V_THREADS", "")
    if not value:
        return
    if not (value.isdigit() and int(value) >= 1):
        raise TinyI2VError(f"TINYI2V_THREADS must be a positive integer, got {value!r}")
    import numba

    numba.set_num_threads(min(int(value), numba.config.NUMBA_NUM_THREADS))


def backend() -> str:
    """The name of the backend in use ('numpy' or 'numba'), selecting the default if needed."""
    if _active is None:
        set_backend()
    return _active.__name__.rsplit(".", 1)[1].removesuffix("_ops")


def __getattr__(name: str):
    if name in KERNELS:
        if _active is None:
            set_backend()
        return getattr(_active, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
