"""Determinism: the same seed gives the same clip across processes, thread counts, weight-loading
paths (mmap or plain reads) and, within a stated tolerance, kernel backends.

The current backend ($TINYI2V_BACKEND) is the one tested, and CI runs the suite once with numba
and once with the numpy backend, so every test here covers both. The noise itself is pinned
bit for bit by tests/test_sampler.py (our own Box-Muller over raw PCG64 words, tinyi2v/rng.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model

from tinyi2v import Pipeline, load_denoiser, load_vae, ops
from tinyi2v.errors import TinyI2VError
from tinyi2v.io import safetensors

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "tinyi2v-demo"
# numpy vs numba kernels (numba reassociates sums): frames may differ by this many uint8
# levels, in at most this fraction of values. Measured on the tiny model: 1 level, 6e-6.
BACKEND_MAX_LEVELS, BACKEND_MAX_FRACTION = 2, 1e-3


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), seed=5)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(model, photo) -> np.ndarray:
    """The clip of seed 3 from this process, loaded the default way."""
    return Pipeline.load(model)(photo, seed=3)


# Runs in a fresh interpreter: BLAS fixes its thread count when numpy is first imported.
CHILD = """
import sys
import numpy as np
from tinyi2v import Pipeline, ops
model, photo, out = sys.argv[1:]
np.save(out, Pipeline.load(model)(np.load(photo), seed=3))
if ops.backend() == "numba":
    import numba
    print("numba threads", numba.get_num_threads())
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_same_clip_in_a_new_process_with_any_thread_count(model, photo, reference, tmp_path,
                                                          threads):
    np.save(tmp_path / "photo.npy", photo)
    n = str(threads)
    env = {**os.environ, "TINYI2V_THREADS": n, "NUMBA_NUM_THREADS": n, "OMP_NUM_THREADS": n,
           "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tmp_path / "photo.npy"),
                          str(tmp_path / "clip.npy")], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    if ops.backend() == "numba":                       # TINYI2V_THREADS reached numba
        assert f"numba threads {threads}" in run.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "clip.npy"), reference)


def test_other_seed_other_clip(model, photo, reference):
    assert not np.array_equal(Pipeline.load(model)(photo, seed=4), reference)


def test_bad_thread_count_is_refused(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setenv("TINYI2V_THREADS", "two")
    with pytest.raises(TinyI2VError, match="TINYI2V_THREADS must be a positive integer"):
        ops.set_backend("numba")
    monkeypatch.delenv("TINYI2V_THREADS")
    ops.set_backend()


# --- no mmap (as on Pyodide) --------------------------------------------------------------

@pytest.mark.parametrize("how", ["TINYI2V_NO_MMAP=1", "no mmap module"])
def test_loading_without_mmap_gives_the_same_clip(model, photo, reference, monkeypatch, how):
    if how == "TINYI2V_NO_MMAP=1":
        monkeypatch.setenv("TINYI2V_NO_MMAP", "1")
    else:
        monkeypatch.setattr(safetensors, "_mmap", None)
    pipe = Pipeline.load(model)
    assert pipe.denoiser.params.file._mm is None       # really read with seek + read
    np.testing.assert_array_equal(pipe(photo, seed=3), reference)


def test_use_mmap_false_gives_the_same_outputs(model):
    """use_mmap=False against use_mmap=True, per component (the pipeline loads with None)."""
    rng = np.random.default_rng(1)
    mapped, read = (load_denoiser(model, use_mmap=m) for m in (True, False))
    assert mapped.params.file._mm is not None and read.params.file._mm is None
    x = rng.normal(size=(1, 8, 2, 2, 3)).astype(np.float32)
    args = (x, np.array([700.0], np.float32), np.ones((1, 12), np.float32),
            np.array([2.0], np.float32))
    np.testing.assert_array_equal(mapped(*args), read(*args))
    vae_mapped, vae_read = (load_vae(model, use_mmap=m) for m in (True, False))
    video = rng.uniform(-1, 1, size=(1, 3, 9, 64, 64)).astype(np.float32)
    latent, _ = vae_mapped.encode(video)
    np.testing.assert_array_equal(latent, vae_read.encode(video)[0])
    np.testing.assert_array_equal(vae_mapped.decode(latent), vae_read.decode(latent))


# --- numpy and numba backends -------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_backends_agree(model, photo, which):
    pytest.importorskip("numba", reason="the numba backend is not installed here")
    if which == "demo" and not (DEMO / "model_index.json").is_file():
        pytest.skip(f"{DEMO} is not there yet; the tiny model case ran")
    folder, kwargs = (model, {}) if which == "tiny" else (DEMO, {"height": 64, "width": 96,
                                                                 "frames": 9, "steps": 2})
    clips = {}
    try:
        for backend in ("numpy", "numba"):
            ops.set_backend(backend)
            clips[backend] = Pipeline.load(folder)(photo, seed=3, **kwargs).astype(np.int16)
    finally:
        ops.set_backend()
    diff = np.abs(clips["numpy"] - clips["numba"])
    assert diff.max() <= BACKEND_MAX_LEVELS
    assert np.mean(diff > 0) <= BACKEND_MAX_FRACTION
    # a real clip, not a constant (std 0): the photo is uniform noise, which the demo's VAE
    # renders as soft blobs (std ~9 with its current decoder; ~66 for the tiny random model)
    assert clips["numpy"].std() > 3
