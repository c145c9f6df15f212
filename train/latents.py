"""Stage (b0): encode clips with the frozen VAE into a latent dataset on disk.

    python -m train.latents --cache /work/data-cache --vae runs/vae/vae --out runs/latents \\
        --max-minutes 13

The VAE never changes after stage (a), so the teacher and the distillation read latents instead
of rendering and encoding clips at every step (rendering + encoding costs about as much as a
teacher step). Per clip, `make_clip` at the deployment size (17 frames, 256x384):

    mean    [C, T', h, w]  posterior mean of the clip
    logvar  [1, T', h, w]  its log-variance (LTX: one channel shared by all); the teacher draws a
                           fresh posterior sample mean + exp(logvar / 2) * eps at every use, as
                           upstream trains on posterior samples
    guide   [C, 1, h, w]   posterior mean of frame 0 encoded as a one-frame video: exactly what
                           the runtime pipeline writes into latent frame 0
    flow    []             the clip's flow score (make_clip's, in 1280x720 pixels per frame)
    photo   []             index of the photo in the split (for inspection)

RUN/train.npz holds the clips of training photos; RUN/heldout.npz a few of held-out photos,
for evaluation losses only. --max-minutes stops early and keeps the clips done so far.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLLTXVideo

from tinyi2v.pipeline import DEFAULTS
from train.common import Run, add_device_arguments, photos, quantise, rendered, to_video
from train.data import make_clip


def encode_clips(vae: AutoencoderKLLTXVideo, images: list[np.ndarray], count: int,
                 frames: int, size: tuple[int, int], batch: int, seed: int, run: Run
                 ) -> dict[str, np.ndarray]:
    """`count` clips of random photos (fewer if the time budget runs out) -> the arrays above.
    Clips are 8-bit (`quantise`), as the runtime's photos and videos are."""

    def make(rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
        index = int(rng.integers(len(images)))
        clip, flow = make_clip(images[index], rng, frames, size)
        return quantise(clip), flow, index

    clips = rendered(make, [seed], run.args.workers, ahead=batch)
    out: dict[str, list[np.ndarray]] = {"mean": [], "logvar": [], "guide": [], "flow": [],
                                        "photo": []}
    done = 0
    while done < count and not run.out_of_time():
        items = [next(clips) for _ in range(min(batch, count - done))]
        video = to_video(np.stack([v for v, _, _ in items]), run.device)   # [B, 3, T, H, W]
        with torch.no_grad():
            posterior = vae.encode(video).latent_dist
            guide = vae.encode(video[:, :, :1]).latent_dist.mean         # [B, C, 1, h, w]
        out["mean"].append(posterior.mean.cpu().numpy())
        out["logvar"].append(posterior.logvar[:, :1].cpu().numpy())
        out["guide"].append(guide.cpu().numpy())
        out["flow"].append(np.array([f for _, f, _ in items], np.float32))
        out["photo"].append(np.array([i for _, _, i in items], np.int32))
        done += len(items)
    clips.close()                                     # stops its rendering pool
    if not done:
        raise SystemExit("the time budget was spent before any clip was encoded")
    return {k: np.concatenate(v) for k, v in out.items()}


def load_latents(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A latent dataset file (train.npz / heldout.npz) as tensors on `device`."""
    with np.load(path) as data:
        return {k: torch.from_numpy(data[k]).to(device) for k in data.files}


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the full-run settings of train/README.md."""
    parser = argparse.ArgumentParser(prog="python -m train.latents",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="photo cache (train.data fetch)")
    parser.add_argument("--vae", type=Path, required=True, help="the VAE folder of stage (a)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=1500, help="training clips")
    parser.add_argument("--heldout-clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=DEFAULTS["frames"])
    parser.add_argument("--size", type=int, nargs=2, default=[DEFAULTS["height"], DEFAULTS["width"]],
                        help="height, width (default: the runtime's default size)")
    parser.add_argument("--batch", type=int, default=4, help="clips per encoder call")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    parser.add_argument("--max-minutes", type=float, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    run = Run(args.out, args)
    vae = AutoencoderKLLTXVideo.from_pretrained(args.vae).eval().to(run.device)
    size = tuple(args.size)
    for split, count, seed in (("heldout", args.heldout_clips, args.seed + 1),
                               ("train", args.clips, args.seed)):
        images = photos(args.cache, split)
        data = encode_clips(vae, images, count, args.frames, size, args.batch, seed, run)
        np.savez(args.out / f"{split}.npz", **data)
        # posterior_std / latent_std: how much of a training sample x0 is the posterior's noise
        run.log({"split": split, "clips": len(data["flow"]), "latent": list(data["mean"].shape[1:]),
                 "latent_std": float(data["mean"].std()),
                 "posterior_std": float(np.exp(0.5 * data["logvar"]).mean()),
                 "seconds": run.elapsed, "cpu_seconds": run.cpu_seconds})
    meta = {"vae": str(args.vae), "frames": args.frames, "size": list(size),
            "seconds": round(run.elapsed, 1)}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
