"""Independent pieces of numpy work on several threads, BLAS single-threaded meanwhile.

An attention head's matrix products are small ([256, 72] x [72, N] in a softmax block) and
BLAS's own threads gain little on them, while numpy's elementwise passes between the products
(max, exp) run on one core. Giving each thread whole heads instead, each product on one core,
keeps every core busy: the softmax block ~1.4x faster on 2 cores. With BLAS left multithreaded
the threads' products contend for its pool, and the same split is 2x slower, so `split_run`
only splits when it can set BLAS's thread count.

numpy has no API for that; this finds OpenBLAS's own `openblas_set_num_threads` in the library
numpy loaded (as threadpoolctl does). Where there is none (Apple's Accelerate, MKL, Pyodide),
or BLAS runs one thread, the work runs in the calling thread as one piece. Each piece computes
what it would compute alone, with the same single-threaded products, so results do not depend
on the split. The thread count is OpenBLAS's process-wide setting: an application calling
numpy's matrix products from another thread during a split gets one BLAS thread meanwhile.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()                  # one split at a time: each sets and restores BLAS


def _library_paths() -> list[str]:
    """Candidate OpenBLAS files: numpy's own bundle (its wheels), else any OpenBLAS mapped into
    this process (Linux: a numpy built against the system's). numpy's first, because other
    wheels (scipy's) bundle an OpenBLAS of their own, whose thread count numpy never reads."""
    import numpy

    root = os.path.dirname(numpy.__file__)
    bundled = sorted(glob.glob(os.path.join(root, ".dylibs", "*openblas*"))
                     + glob.glob(os.path.join(os.path.dirname(root), "numpy.libs", "*openblas*")))
    if bundled:
        return bundled
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split(None, 5)[-1].strip() for line in maps if "openblas" in line}
    except OSError:
        return []
    return sorted(p for p in mapped if os.path.isfile(p))


@functools.cache
def _openblas() -> tuple | None:
    """OpenBLAS's (set_num_threads, get_num_threads), looked up once; None where not found."""
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):       # numpy's wheels, a system OpenBLAS
            for suffix in ("64_", ""):                       # 64-bit integer builds, plain ones
                try:
                    set_threads = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                    get_threads = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
                set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
                get_threads.argtypes, get_threads.restype = [], ctypes.c_int
                return set_threads, get_threads
    return None


def split_run(work: Callable[[range], None], n: int) -> None:
    """work(range(j, n, T)) for j < T, on T threads (T = BLAS's thread count, at most n), with
    BLAS single-threaded meanwhile; work(range(n)) here where that cannot be arranged."""
    found = _openblas()
    before = found[1]() if found else 1
    threads = min(before, n)
    if threads <= 1 or not _lock.acquire(blocking=False):    # another split is running
        work(range(n))
        return
    set_threads = found[0]
    try:
        set_threads(1)
        with ThreadPoolExecutor(threads - 1) as pool:
            others = [pool.submit(work, range(j, n, threads)) for j in range(1, threads)]
            work(range(0, n, threads))                       # this thread takes a share too
            for done in others:
                done.result()                                # re-raise a worker's error here
    finally:
        set_threads(before)
        _lock.release()
