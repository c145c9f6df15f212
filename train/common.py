"""What every training stage shares: run folders, the JSONL log, the time budget, the learning-rate
schedule, checkpoints (resume), an EMA copy, and the torch <-> tinyi2v component bridge.

A stage is `python -m train.<stage> --out RUN ...`; RUN ends up holding

    log.jsonl         one JSON object per line: {"step", "loss", ..., "lr", "seconds",
                      "step_seconds"} every --log-every steps, {"step", "eval_...": ...} at evals
    summary.json      steps done, wall time, median seconds per optimisation step, last losses
    checkpoint.pt     model + optimizer (+ EMA) + step + elapsed time: `--resume` continues from it
    <the product>     a component folder the next stage (or train/export.py) reads

Time is the scarce resource (the default model trains on a 2-core CPU), so every loop stops at
`--steps` or `--max-minutes`, whichever comes first, and the learning rate decays over whichever
of the two is nearer (see `lr_factor`).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from tinyi2v.weights import Component, save_component
from train.data import load_photo, read_manifest

Losses = dict[str, torch.Tensor]          # "loss" is optimised; the other entries are logged
T = TypeVar("T")


def add_loop_arguments(parser: argparse.ArgumentParser, steps: int, batch: int, lr: float,
                       warmup: int, eval_every: int) -> None:
    """The options every stage's optimisation loop takes, with that stage's defaults."""
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument("--steps", type=int, default=steps, help="optimisation steps at most")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget of the stage; stops (and saves) when spent")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=eval_every, help="0: only at the end")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a stage computes: torch's CPU threads, the torch device, the clip-rendering workers."""
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes rendering training clips (0: one background thread; a "
                             "GPU consumes clips faster than one core renders them)")


def lr_factor(step: int, steps: int, warmup: int, time_fraction: float | None) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak over the run's progress
    max(step / steps, time_fraction): a run cut short by its time budget still ends low."""
    if step < warmup:
        return (step + 1) / warmup
    progress = max(step / max(steps, 1), time_fraction or 0.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """An exponential moving average of a model's parameters, kept as a second model (eval and
    export use it). The decay ramps up as (1 + step) / (10 + step) so early steps count."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema, p in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(p, 1 - d)


@dataclass
class Run:
    """A run folder with its log; `elapsed` counts the time of earlier (resumed) sessions too."""
    out: Path
    args: argparse.Namespace
    start: float = field(default_factory=time.perf_counter)
    start_cpu: float = field(default_factory=time.process_time)
    earlier: float = 0.0

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(self.args.threads)
        self.device = torch.device(self.args.device)
        if self.device.type == "cuda":        # TF32 matmuls and autotuned convolutions
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        (self.out / "args.json").write_text(json.dumps(vars(self.args), indent=1, default=str))
        self.checkpoint = self.out / "checkpoint.pt"
        resume = getattr(self.args, "resume", False) and self.checkpoint.exists()
        self.resume_state = (torch.load(self.checkpoint, map_location=self.device,
                                        weights_only=True) if resume else None)
        if resume:
            self.earlier = self.resume_state["elapsed"]
        else:
            (self.out / "log.jsonl").unlink(missing_ok=True)     # a fresh run starts a fresh log

    @property
    def first_step(self) -> int:
        """The step this session starts at (> 0 when resuming): seeds data streams, so a
        resumed run does not replay the clips it has already seen."""
        return self.resume_state["step"] if self.resume_state else 0

    @property
    def elapsed(self) -> float:
        return self.earlier + time.perf_counter() - self.start

    @property
    def cpu_seconds(self) -> float:
        """Process CPU time of this session, all threads: on a busy machine, wall time
        includes waiting for the cores, this does not."""
        return time.process_time() - self.start_cpu

    @property
    def budget(self) -> float | None:
        return None if self.args.max_minutes is None else 60.0 * self.args.max_minutes

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed >= self.budget

    def log(self, record: Mapping) -> None:
        record = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in record.items()}
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(" ".join(f"{k}={v}" for k, v in record.items()), file=sys.stderr, flush=True)


def median_after_warmup(times: list[float]) -> float | None:
    """The median without the first 3 entries (allocation, cold caches), where there are more."""
    return round(statistics.median(times[3:] or times), 4) if times else None


def save_checkpoint(path: Path, state: Mapping) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)                 # a crash mid-write never leaves a broken checkpoint


def train_loop(run: Run, model: nn.Module, loss_fn: Callable[[int], Losses],
               evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
               ema: EMA | None = None, grad_clip: float = 1.0) -> nn.Module:
    """AdamW over `loss_fn(step)` until --steps or --max-minutes; logs, evaluates (on the EMA
    model when there is one), checkpoints and writes summary.json. Returns the model to keep
    (the EMA model when there is one)."""
    args = run.args
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=0.0)
    step = 0
    # the loop's share of the time budget starts here: what the stage did before (loading,
    # teacher trajectories) does not eat into the learning-rate schedule
    loop_start = run.elapsed
    if run.resume_state:
        state = run.resume_state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        step, loop_start = state["step"], state["loop_start"]
        run.log({"resumed_at_step": step, "seconds": run.elapsed})
    keep = ema.model if ema is not None else model

    def time_fraction() -> float | None:
        if run.budget is None:
            return None
        return (run.elapsed - loop_start) / max(run.budget - loop_start, 1e-9)

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "elapsed": run.elapsed, "loop_start": loop_start}
        save_checkpoint(run.checkpoint, state | ({"ema": ema.model.state_dict()} if ema else {}))

    def run_eval() -> dict[str, float]:
        keep.eval()
        with torch.no_grad():
            result = evaluate(keep)
        model.train()
        run.log({"step": step, **{f"eval_{k}": v for k, v in result.items()},
                 "seconds": run.elapsed})
        return result

    model.train()
    step_times: list[float] = []
    step_cpu: list[float] = []            # process CPU time (all threads): robust to a busy machine
    window: dict[str, list[float]] = {}
    last_losses: dict[str, float] = {}
    last_save, result, stopped_by = time.perf_counter(), {}, "steps"
    while step < args.steps:
        if run.out_of_time():
            stopped_by = "time"
            break
        if evaluate and args.eval_every and step % args.eval_every == 0:
            result = run_eval()
        tick, cpu_tick = time.perf_counter(), time.process_time()
        lr = args.lr * lr_factor(step, args.steps, args.warmup, time_fraction())
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        step += 1
        # reading the losses waits for the device, so on a GPU the step time includes its work
        for k, v in losses.items():
            window.setdefault(k, []).append(float(v.detach()))
        step_times.append(time.perf_counter() - tick)
        step_cpu.append(time.process_time() - cpu_tick)
        if step % args.log_every == 0 or step == args.steps:
            run.log({"step": step, **{k: float(np.mean(v)) for k, v in window.items()},
                     "lr": lr, "seconds": run.elapsed,
                     "step_seconds": float(np.mean(step_times[-len(window["loss"]):]))})
            last_losses, window = {k: float(np.mean(v)) for k, v in window.items()}, {}
        if time.perf_counter() - last_save > 60 * args.checkpoint_minutes:
            save()
            last_save = time.perf_counter()
    if window:
        last_losses = {k: float(np.mean(v)) for k, v in window.items()}
    save()
    if evaluate:
        result = run_eval()
    summary = {"steps": step, "stopped_by": stopped_by, "seconds": round(run.elapsed, 1),
               "median_step_seconds": median_after_warmup(step_times),
               "median_step_cpu_seconds": median_after_warmup(step_cpu),
               "last_losses": last_losses,
               "eval": result}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return keep


# --------------------------------------------------------------------------------------------
# Data and components
# --------------------------------------------------------------------------------------------

def photos(cache: Path, split: str) -> list[np.ndarray]:
    """The cached photos of one split ("train" or "heldout") as [h, w, 3] uint8 arrays."""
    chosen = [p for p in read_manifest(cache / "manifest.json") if p.split == split]
    if not chosen:
        raise SystemExit(f"{cache}: no '{split}' photos in manifest.json "
                         f"(run: python -m train.data fetch --cache {cache})")
    return [load_photo(cache, p) for p in chosen]


_make: Callable | None = None     # a rendering worker process's `make` (see `rendered`)


def _install(make: Callable) -> None:
    global _make
    _make = make


def _render(key: list[int]):
    return _make(np.random.default_rng(key))


def rendered(make: Callable[[np.random.Generator], T], seed: Sequence[int], workers: int = 0,
             ahead: int = 1) -> Iterator[T]:
    """Endless `make(rng)` results, the i-th drawn with its own generator seeded [*seed, i], so
    the stream is the same whatever computes it. workers = 0: a background thread computes
    `ahead` results while the caller uses the current one (make_clip spends its time in numpy,
    which releases the GIL); workers > 0: forked processes (fork passes `make` without pickling
    it) keep 2 x workers results in flight."""
    if workers:
        pool, task = multiprocessing.get_context("fork").Pool(workers, _install, (make,)), _render
    else:
        pool, task = ThreadPool(1), lambda key: make(np.random.default_rng(key))
    keys = ([*seed, i] for i in itertools.count())
    with pool:
        pending = deque(pool.apply_async(task, (next(keys),))
                        for _ in range(max(2 * workers, ahead)))
        while True:
            pending.append(pool.apply_async(task, (next(keys),)))
            yield pending.popleft().get()


def quantise(clip: np.ndarray) -> np.ndarray:
    """make_clip's float clip in [-1, 1] -> uint8, as a video file stores it (4x fewer bytes to
    pass from a rendering process)."""
    return np.round((clip + 1) * 127.5).astype(np.uint8)


def to_video(clips: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Clips [..., T, H, W, 3] (float in [-1, 1], or uint8 from `quantise`) -> the VAE's video
    layout [..., 3, T, H, W], float32 in [-1, 1], on `device`."""
    video = torch.from_numpy(np.ascontiguousarray(clips)).to(device)
    if video.dtype == torch.uint8:
        video = video.float() / 127.5 - 1
    return video.movedim(-1, -4).contiguous()


def save_torch_component(path: Path, model: nn.Module, config: Mapping, dtype: str = "F32") -> Path:
    """A model's state dict as a tinyi2v component folder (replacing an earlier one)."""
    if path.exists():
        for f in path.iterdir():
            f.unlink()
    tensors = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    return save_component(path, config, tensors, dtype=dtype)


def load_component_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A component folder's config and tensors (upcast to float32) for `load_state_dict`."""
    component = Component(path)
    return component.config, {k: torch.from_numpy(np.array(component[k])) for k in component}
