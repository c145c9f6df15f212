"""How each stage's time and memory grow with frames and resolution: `tinyi2v bench` per size.

    python benchmarks/official_model.py /tmp/official          # once
    python benchmarks/bench_growth.py --model /tmp/official/turbo

Runs `tinyi2v bench` (2 steps) in a fresh process for 17 frames at 360p, 480p and 720p, and for
9, 17 and 33 frames at 720p (sizes rounded to the VAE's multiples of 32, as `animate` does), and
prints one table: seconds per stage, peak RSS per stage, and the denoiser's tokens. Not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys

SIZES = [("360p", 17, 352, 640), ("480p", 17, 480, 864), ("720p", 17, 736, 1280),
         ("720p", 9, 736, 1280), ("720p", 33, 736, 1280)]
STAGES = ("encode", "denoise step 2/2", "decode", "write")


def bench(model: str, frames: int, height: int, width: int,
          backend: str) -> tuple[int, dict[str, list[str]]]:
    """One `tinyi2v bench` run -> (denoiser tokens, {stage: [s, GFLOP, GFLOP/s, peak MB]})."""
    run = subprocess.run([sys.executable, "-m", "tinyi2v", "bench", "--model", model,
                          "--frames", str(frames), "--height", str(height), "--width", str(width),
                          "--steps", "2", "--backend", backend],
                         capture_output=True, text=True, check=True)
    lines = run.stdout.splitlines()
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]]
            for cells in (line.split("|") for line in lines if line.startswith("| "))}
    latent = json.loads(re.search(r"latent (\[[\d, ]+\])", lines[0]).group(1))   # [B, C, T, h, w]
    return math.prod(latent[2:]), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model folder (official_model.py)")
    ap.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    args = ap.parse_args()
    print("| size | frames | tokens | encode s | denoise s/step | decode s | write s | "
          "peak MB: encode / denoise / decode / write |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, frames, height, width in SIZES:
        tokens, rows = bench(args.model, frames, height, width, args.backend)
        seconds = " | ".join(rows[s][0] for s in STAGES)
        peaks = " / ".join(rows[s][3] for s in STAGES)
        print(f"| {label} {width}x{height} | {frames} | {tokens} | {seconds} | {peaks} |",
              flush=True)


if __name__ == "__main__":
    main()
