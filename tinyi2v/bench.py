"""`tinyi2v bench`: one `animate`, measured stage by stage.

    tinyi2v bench                                        # the bundled model, its default size
    tinyi2v bench photo.jpg --model M --height 720 --width 1280 --steps 2

Runs what `animate` runs (load, encode, each denoising step, decode, write) and reports per
stage: wall seconds, useful GFLOP and GFLOP/s (the denoiser's from its shapes, `denoiser.flops`;
the VAE's counted by its convolutions, `vae.layers.ConvFlops`), and the peak resident memory of
the process during that stage (Linux: VmHWM, reset between stages through /proc/self/clear_refs;
elsewhere "-"). A warm-up call at the smallest size first loads (or compiles) the numba kernels,
so the stages show steady-state speed; its time is reported as its own row.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .denoiser import flops
from .io.video import h264_available, write_video
from .pipeline import Pipeline
from .vae.layers import ConvFlops


@dataclass
class Row:
    stage: str
    seconds: float
    gflop: float | None
    peak_mb: float | None


def peak_rss_mb() -> float | None:
    """The process's peak resident set since the last `reset_peak` (VmHWM), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def reset_peak() -> bool:
    """Start a new peak at the current resident set (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageMeter:
    """A pipeline progress callback that closes a row at each stage boundary: after the encode,
    after every denoising step, at the end of the decode; `close` ends any other stage."""

    def __init__(self, step_gflop: float):
        self.step_gflop, self.rows = step_gflop, []
        self.start()

    def start(self) -> None:
        reset_peak()
        self.tick, self.conv = time.perf_counter(), ConvFlops.total

    def close(self, stage: str, gflop: float | None = None) -> None:
        self.rows.append(Row(stage, time.perf_counter() - self.tick, gflop, peak_rss_mb()))
        self.start()

    def __call__(self, stage: str, step: int, total: int, elapsed: float) -> None:
        conv = (ConvFlops.total - self.conv) / 1e9
        if stage == "denoise":
            self.close(f"denoise step {step}/{total}", self.step_gflop)
        elif step == total:                                   # encode; the decode's last slab
            self.close(stage, conv)


def test_photo(height: int, width: int) -> np.ndarray:
    """A smooth colour pattern (no file needed): [height, width, 3] uint8."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    return ((rgb + 1) * 127.5).astype(np.uint8)


def run(pipe: Pipeline, photo: np.ndarray, output: str | None, frames: int | None,
        height: int | None, width: int | None, steps: int | None, motion: float | None,
        seed: int, load_seconds: float) -> tuple[list[Row], object]:
    """Warm-up, then one measured call and its write -> (rows, the plan)."""
    plan = pipe.plan(photo.shape[:2], frames, height, width, steps, motion)
    start = time.perf_counter()
    factor = pipe.vae.spatial_compression
    pipe(photo, frames=1, height=factor, width=factor, steps=1, seed=seed)
    warmup = time.perf_counter() - start
    meter = StageMeter(flops(pipe.denoiser.config, plan.latent_shape) / 1e9)
    meter.rows = [Row("load", load_seconds, None, None), Row("warm-up", warmup, None, None)]
    clip = pipe(photo, seed=seed, progress=meter, plan=plan)
    meter.start()
    with tempfile.TemporaryDirectory() as tmp:
        fmt = "mp4" if h264_available() else "webp"
        write_video(output or Path(tmp) / f"bench.{fmt}", clip, pipe.defaults["fps"], {})
        meter.close("write")
    return meter.rows, plan


def table(rows: list[Row]) -> list[str]:
    """Markdown lines: one row per stage, then the total."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| stage | s | GFLOP | GFLOP/s | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        rate = r.gflop / r.seconds if r.gflop and r.seconds > 0 else None
        lines.append(f"| {r.stage} | {r.seconds:.2f} | {num(r.gflop, '.1f')} | "
                     f"{num(rate, '.1f')} | {num(r.peak_mb, '.0f')} |")
    measured = [r for r in rows if r.stage not in ("load", "warm-up")]
    gflop = sum(r.gflop or 0 for r in measured)
    seconds = sum(r.seconds for r in measured)
    peaks = [r.peak_mb for r in measured if r.peak_mb is not None]
    lines.append(f"| total (encode to write) | {seconds:.2f} | {gflop:.1f} | "
                 f"{gflop / seconds:.1f} | {num(max(peaks) if peaks else None, '.0f')} |")
    return lines


def threads() -> str:
    """The thread settings that apply (BLAS reads its variables once, at numpy's start)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TINYI2V_THREADS")
    set_ = [f"{n}={os.environ[n]}" for n in names if n in os.environ]
    return ", ".join(set_) or f"defaults ({os.cpu_count()} cores)"

