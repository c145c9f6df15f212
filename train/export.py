"""Stage (d): a tinyi2v model folder from the trained VAE and a trained denoiser (FP16).

    python -m train.export --vae runs/vae/vae --denoiser runs/student --out weights/tinyi2v-demo
    python -m train.export --link-vae weights/tinyi2v-demo --denoiser runs/teacher \
        --out weights/tinyi2v-teacher

Writes, next to --out, a complete folder and renames it into place once `tinyi2v.Pipeline`
loads it and it is under --max-mb:

    model_index.json                 components + defaults (height, width, frames, fps, motion)
    transformer/                     the runtime config (tinyi2v.denoiser.official_config) + FP16
    vae/                             the diffusers config.json as is + FP16, diffusers key names
    scheduler/scheduler_config.json  the denoiser run's schedule: the student's explicit sigmas
                                     (with the teacher's schedule recorded beside them), or the
                                     teacher's shift-3 step count

With --link-vae MODEL, vae/ is a relative symbolic link to MODEL/vae instead of a copy: the
teacher ships beside the student for 4.5 MB instead of 24 MB (the two share the VAE anyway).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tinyi2v.convert import convert_folder
from tinyi2v.pipeline import DEFAULTS, Pipeline
from tinyi2v.weights import save_model_index

COMPONENTS = {"transformer": ["tinyi2v", "MobileI2VTransformer"],
              "vae": ["diffusers", "AutoencoderKLLTXVideo"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export(vae: Path | None, denoiser: Path, out: Path, defaults: dict, max_mb: float,
           link_vae: Path | None = None) -> int:
    """Write the model folder `out` (which must not exist yet) with the VAE converted from
    `vae`, or linked to the model folder `link_vae`'s; returns its size in bytes (a linked VAE
    not counted)."""
    if out.exists():
        raise SystemExit(f"{out}: already exists; remove it or choose another --out")
    if (vae is None) == (link_vae is None):
        raise SystemExit("give exactly one of --vae and --link-vae")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if link_vae is None:
            convert_folder(vae, tmp / "vae", "float16")
            # diffusers records the folder a fine-tuned VAE was loaded from: a local path
            config = json.loads((tmp / "vae" / "config.json").read_text())
            if config.pop("_name_or_path", None) is not None:
                (tmp / "vae" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        else:               # relative to out's folder, which tmp shares: valid after the rename
            Pipeline.load(link_vae)
            (tmp / "vae").symlink_to(os.path.relpath(link_vae / "vae", out), True)
        convert_folder(denoiser / "transformer", tmp / "transformer", "float16")
        (tmp / "scheduler").mkdir()
        shutil.copy(denoiser / "scheduler" / "scheduler_config.json", tmp / "scheduler")
        save_model_index(tmp, COMPONENTS, defaults)
        pipe = Pipeline.load(tmp)
        plan = pipe.plan((defaults["height"], defaults["width"]))
        sizes = {name: folder_bytes(tmp / name) for name in COMPONENTS
                 if not (tmp / name).is_symlink()}
        total = sum(sizes.values()) + (tmp / "model_index.json").stat().st_size
        print(f"latent {list(plan.latent_shape)} for {defaults['frames']}x{plan.height}x"
              f"{plan.width}, {plan.steps} steps (sigmas {[round(float(s), 4) for s in plan.sigmas]})")
        print("FP16 size: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items())
              + f"; total {total / 2**20:.2f} MiB ({total / 1e6:.2f} MB)")
        if total > max_mb * 1e6:
            raise SystemExit(f"the model is {total / 1e6:.2f} MB, over --max-mb {max_mb}")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}")
    return total


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the full-run settings of train/README.md."""
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--vae", type=Path, help="the VAE folder of train.vae")
    parser.add_argument("--link-vae", type=Path,
                        help="an exported model folder whose vae/ to link to instead of --vae")
    parser.add_argument("--denoiser", type=Path, required=True,
                        help="a train.teacher or train.distill run folder")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    for name in ("height", "width", "frames"):
        parser.add_argument(f"--{name}", type=int, default=DEFAULTS[name])
    for name in ("fps", "motion"):
        parser.add_argument(f"--{name}", type=float, default=DEFAULTS[name])
    parser.add_argument("--max-mb", type=float, default=40.0, help="size limit of the folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = {k: getattr(args, k) for k in ("height", "width", "frames", "fps", "motion")}
    export(args.vae, args.denoiser, args.out, defaults, args.max_mb, args.link_vae)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
