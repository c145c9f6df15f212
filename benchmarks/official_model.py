"""Model folders with MobileI2V's official shapes and random weights (FP16), for `tinyi2v bench`.

    python benchmarks/official_model.py DIR
    tinyi2v bench --model DIR/ltx   --height 720 --width 1280 --steps 2   # LTX 0.9.0 decoder
    tinyi2v bench --model DIR/turbo --height 720 --width 1280 --steps 2   # Turbo-VAED decoder

DIR/ltx holds the 300M denoiser (bench_denoiser.build_model), the LTX-Video 0.9.0 VAE and a
scheduler; DIR/turbo links to the same three and adds the Turbo-VAED decoder as `decoder/`, which
the pipeline then decodes with. Random weights: the clips are noise, the speed and memory are
those of the real model. About 1.5 GB on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_denoiser  # noqa: E402
import bench_vae  # noqa: E402
from tinyi2v.weights import save_model_index  # noqa: E402

INDEX = {"transformer": ["tinyi2v", "MobileI2VTransformer"],
         "vae": ["diffusers", "AutoencoderKLLTXVideo"],
         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
DEFAULTS = {"height": 720, "width": 1280, "frames": 17, "fps": 24, "motion": 2.0}


def build(root: Path, seed: int = 0) -> None:
    ltx, turbo = root / "ltx", root / "turbo"
    bench_denoiser.build_model(ltx / "transformer", seed)
    bench_vae.build_model(ltx / "vae", "decode", seed + 1)
    (ltx / "scheduler").mkdir()
    (ltx / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
         "num_inference_steps": 30, "num_train_timesteps": 1000}))
    save_model_index(ltx, INDEX, DEFAULTS)
    turbo.mkdir()
    for name in ("transformer", "vae", "scheduler"):
        os.symlink(Path("..") / "ltx" / name, turbo / name)
    bench_vae.build_model(turbo / "decoder", "turbo", seed + 2)
    save_model_index(turbo, INDEX | {"decoder": ["diffusers", "AutoencoderKLTurboVAED"]},
                     DEFAULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="folder to create")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.root.exists():
        ap.error(f"{args.root} exists")
    build(args.root, args.seed)
    print(f"wrote {args.root}/ltx and {args.root}/turbo")


if __name__ == "__main__":
    main()
