"""What Pyodide, Termux and read-only installs lack: the runtime must not need threads, mmap,
subprocesses or a writable home directory (docs/porting.md).

Each check runs in a fresh interpreter, because an audit hook cannot be removed once added."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model
from PIL import Image

from tinyi2v import ops
from tinyi2v.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]

# Runs `tinyi2v animate` in a process where mmap cannot be imported (as on Pyodide), starting a
# thread or a process raises, and every file write outside the output folder is recorded.
CHILD = r"""
import os, sys, threading, _thread
sys.modules["mmap"] = None                       # `import mmap` now fails, as on Pyodide
out_dir = os.path.realpath(sys.argv[1])
problems = []

def refuse(*args, **kwargs):
    raise RuntimeError("a thread was started")
threading.Thread.start = _thread.start_new_thread = refuse

WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
FORBIDDEN = ("subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.posix_spawn",
             "os.exec", "os.spawn", "mmap.__new__", "_thread.start_new_thread")
PATH_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree")

def outside(path):
    real = os.path.realpath(os.fsdecode(path))
    return os.path.commonpath([real, out_dir]) != out_dir

def hook(event, args):
    if event in FORBIDDEN:
        problems.append(event)
        raise RuntimeError(f"forbidden: {event}")
    if event == "open" and not isinstance(args[0], int):
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & WRITE
        if writes and outside(path):
            problems.append(f"write to {path}")
    elif event in PATH_EVENTS and outside(args[0]):
        problems.append(f"{event} {args[0]}")

sys.addaudithook(hook)
from tinyi2v.cli import cli
cli.main(sys.argv[2:], standalone_mode=False)
import tinyi2v.io.safetensors
assert tinyi2v.io.safetensors._mmap is None, "the mmap-less path was not taken"
print("problems:", problems)
"""


def child_env(tmp_path: Path, pythonpath: Path) -> dict[str, str]:
    """An environment with no usable home: HOME lies under a regular file, so nothing (not even
    root) can create it."""
    (tmp_path / "a-file").write_bytes(b"")
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "PYTHONPATH", "TINYI2V_NO_MMAP")}
    env.update(HOME=str(tmp_path / "a-file" / "home"), PYTHONPATH=str(pythonpath),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return env


def test_animate_needs_no_threads_mmap_subprocess_or_home(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    photo = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    out.mkdir()
    env = {**child_env(tmp_path, ROOT), "TINYI2V_BACKEND": "numpy"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), "animate", str(tmp_path / "photo.png"),
         "-o", str(out / "frames"), "--model", str(model), "--seed", "3", "-q"],
        check=False, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "problems: []" in run.stdout, run.stdout

    # The clip is the one a normal in-process run (mmap allowed) makes.
    previous = ops.backend()
    ops.set_backend("numpy")
    try:
        expected = Pipeline.load(model)(photo, seed=3)
    finally:
        ops.set_backend(previous)
    written = sorted((out / "frames").glob("frame_*.png"))
    assert len(written) == len(expected)
    assert np.array_equal(np.stack([np.asarray(Image.open(f)) for f in written]), expected)


def test_numba_without_a_writable_cache_folder(tmp_path):
    """A read-only install run by a user without a writable home: numba finds nowhere to keep
    its cache (cache=True then raises at import); the kernels must still compile and run."""
    pytest.importorskip("numba")
    pkg = tmp_path / "site"
    shutil.copytree(ROOT / "tinyi2v", pkg / "tinyi2v",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "tinyi2v" / "ops" / "__pycache__").write_bytes(b"")  # a file: no cache beside it
    code = ("import numpy as np, tinyi2v\n"
            f"assert tinyi2v.__file__.startswith({str(pkg)!r}), tinyi2v.__file__\n"
            "from tinyi2v import ops\n"
            "assert ops.set_backend('numba') == 'numba'\n"
            "x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(1, 2, 1, 8)\n"
            "w, b = np.ones((8, 3, 3), np.float32), np.zeros(8, np.float32)\n"
            "from tinyi2v.ops import numpy_ops\n"
            "assert np.allclose(ops.depthwise_silu_gate(x, w, b),\n"
            "                   numpy_ops.depthwise_silu_gate(x, w, b), atol=1e-5)\n")
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path,
                         env=child_env(tmp_path, pkg), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_numba_cache_lives_in_the_user_cache_folder(tmp_path):
    """numba's cache goes to $XDG_CACHE_HOME/tinyi2v/numba, never into the package: a
    tinyi2v/ops/__pycache__ left in site-packages by pip uninstall shadowed a later editable
    install as a namespace package ("module 'tinyi2v.ops' has no attribute ...")."""
    pytest.importorskip("numba")
    pkg = ROOT / "tinyi2v"

    def package_cache():
        return {p for ext in ("*.nbi", "*.nbc") for p in pkg.rglob(ext)}

    before = package_cache()
    code = ("import numpy as np, tinyi2v\n"
            f"assert tinyi2v.__file__.startswith({str(pkg)!r}), tinyi2v.__file__\n"
            "from tinyi2v import ops\n"
            "assert ops.set_backend('numba') == 'numba'\n"
            "h = np.array([0.5, -2.0, 65504.0], np.float16)\n"
            "assert np.array_equal(ops.to_float32(h), h.astype(np.float32))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env.update(XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cached = {p.suffix for p in (tmp_path / "tinyi2v" / "numba").rglob("*.nb?")}
    assert cached == {".nbi", ".nbc"}, cached
    assert package_cache() == before, sorted(map(str, package_cache() - before))


def test_version_without_an_installed_distribution(monkeypatch):
    """Run from a checkout or a copied folder (PYTHONPATH, Pyodide's file system), tinyi2v has no
    package metadata; --version must still answer instead of raising."""
    import importlib.metadata

    from click.testing import CliRunner

    import tinyi2v
    from tinyi2v.cli import cli

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"tinyi2v, version {tinyi2v.__version__}"
