"""Time every stage at the full-run sizes for a few steps, and project the full run.

    python -m train.measure --cache /work/data-cache --threads 2

Runs each stage's command with its defaults (the full-run settings) but a few steps, in a
temporary folder, then prints seconds per unit (optimisation step, clip, trajectory) and the
minutes the full run's units would take, plus the time of a whole numpy-runtime `animate` call
with the exported model (2 and 16 steps). On a shared machine the numbers move with the load:
the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tinyi2v.io.image import load_image
from tinyi2v.pipeline import Pipeline
from train import distill, export, latents, teacher, vae

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cat.jpg"


def last(run: Path, key: str) -> float:
    """The last value of `key` in a run's log."""
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if key in r][-1]


def step_seconds(run: Path) -> tuple[float, float]:
    """(wall, CPU) median seconds per optimisation step."""
    summary = json.loads((run / "summary.json").read_text())
    return summary["median_step_seconds"], summary["median_step_cpu_seconds"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.measure",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="optimisation steps per stage")
    parser.add_argument("--clips", type=int, default=24, help="clips for the latent stage")
    args = parser.parse_args(argv)
    loop = ["--threads", str(args.threads), "--eval-every", "0", "--steps", str(args.steps),
            "--log-every", str(args.steps)]
    rows = []                        # (stage, (wall, CPU) seconds per unit, unit, full-run units)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vae.main(["--cache", str(args.cache), "--out", str(root / "vae"), "--eval-clips", "1",
                  "--scale-clips", "2", *loop])
        rows.append(("vae", step_seconds(root / "vae"), "step",
                     vae.build_parser().get_default("steps")))

        latents.main(["--cache", str(args.cache), "--vae", str(root / "vae" / "vae"),
                      "--out", str(root / "latents"), "--clips", str(args.clips),
                      "--heldout-clips", "8", "--threads", str(args.threads)])
        # the log has one line per split, held-out first: the training split's own time
        log = [json.loads(line) for line in (root / "latents" / "log.jsonl").read_text().splitlines()]
        per_clip = tuple((log[-1][k] - log[-2][k]) / log[-1]["clips"]
                         for k in ("seconds", "cpu_seconds"))
        rows.append(("latents", per_clip, "clip", latents.build_parser().get_default("clips")))

        teacher.main(["--latents", str(root / "latents"), "--out", str(root / "teacher"),
                      "--eval-clips", "8", *loop])
        rows.append(("teacher", step_seconds(root / "teacher"), "step",
                     teacher.build_parser().get_default("steps")))

        defaults = distill.build_parser()
        batch = defaults.get_default("batch")
        distill.main(["--teacher", str(root / "teacher"), "--latents", str(root / "latents"),
                      "--out", str(root / "student"), "--trajectories", str(2 * batch),
                      "--eval-clips", "8", *loop])
        rows.append(("distill: teacher trajectories",
                     tuple(last(root / "student", k) / (2 * batch)
                           for k in ("trajectory_seconds", "trajectory_cpu_seconds")),
                     "trajectory", defaults.get_default("trajectories")))
        rows.append(("distill: student", step_seconds(root / "student"), "step",
                     defaults.get_default("steps")))

        export.main(["--vae", str(root / "vae" / "vae"), "--denoiser", str(root / "student"),
                     "--out", str(root / "model")])
        pipe = Pipeline.load(root / "model")
        image = load_image(EXAMPLE)
        pipe(image, steps=1)                        # numba compiles its kernels on first use
        runtime = {}
        for steps in (2, teacher.TEACHER_STEPS):
            start = time.perf_counter()
            pipe(image, steps=steps)
            runtime[steps] = time.perf_counter() - start
    load_after = os.getloadavg()

    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"torch threads {args.threads}")
    print(f"{'stage':<30}{'wall s':>8}{'CPU s':>8}  {'per':<11}{'full run':>9}"
          f"{'wall min':>9}{'CPU min':>9}")
    for stage, (wall, cpu), unit, count in rows:
        print(f"{stage:<30}{wall:>8.3f}{cpu:>8.3f}  {unit:<11}{count:>9}"
              f"{wall * count / 60:>9.1f}{cpu * count / 60:>9.1f}")
    print(f"{'total':<30}{'':>16}  {'':<11}{'':>9}"
          f"{sum(w * c for _, (w, _), _, c in rows) / 60:>9.1f}"
          f"{sum(u * c for _, (_, u), _, c in rows) / 60:>9.1f}")
    print(f"numpy runtime, whole animate call at the model's defaults: 2 steps "
          f"{runtime[2]:.1f} s, {teacher.TEACHER_STEPS} steps "
          f"{runtime[teacher.TEACHER_STEPS]:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
