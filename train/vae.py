"""Stage (a): train a small LTX-Video VAE (diffusers `AutoencoderKLLTXVideo`, 0.9.0 blocks, so the
numpy runtime's `tinyi2v/vae/ltx.py` runs it) on procedural clips of the training photos.

    python -m train.vae --cache /work/data-cache --out runs/vae --max-minutes 45

Architecture (defaults; train/README.md explains the choice): patch 8 (space-to-depth 8x8, 192
channels) then two stride-2 levels: 32x spatial, 4x temporal compression, 32 latent channels.
A 17x256x384 clip becomes a latent [32, 5, 8, 12]: 480 denoiser tokens. Encoder channels
32/64/128, decoder 128/96/64 (the decoder sets the picture quality, the encoder only runs once
per video), one resnet per level: 10.0 M parameters, 19.1 MiB in FP16.

Loss per crop: L1(recon, clip) + grad_weight * L1 of their spatial finite differences (edges;
L1 alone blurs) + kl_weight * mean KL(posterior || N(0, I)), on a posterior sample. Crops of
deployment-size clips: `make_clip` at 256x384 keeps the motion (pixels per frame) and detail
scale the model will see, and 128x192 crops of it keep a step cheap.

The product, RUN/vae/, is a diffusers folder (config.json + FP32 safetensors) whose latents are
rescaled to unit standard deviation (see `normalise_latents_`): the runtime and the denoiser use
raw latents, as MobileI2V does (scaling_factor 1.0, no per-channel statistics).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLLTXVideo

from tinyi2v.pipeline import DEFAULTS
from train.common import (Losses, Run, add_loop_arguments, photos, quantise, rendered, to_video,
                          train_loop)
from train.data import make_clip


def vae_config(latent_channels: int = 32, encoder_channels: Sequence[int] = (32, 64, 128),
               decoder_channels: Sequence[int] = (64, 96, 128), layers: int = 1,
               patch_size: int = 8) -> dict:
    """Keyword arguments of AutoencoderKLLTXVideo for a 0.9.0-style VAE: conv downsampling, no
    timestep conditioning or noise injection. Every level but the last halves T, H and W, so
    the compression is patch_size * 2^(levels - 1) in space and 2^(levels - 1) in time.
    Decoder channels are listed from the full-resolution level down, as diffusers does."""
    levels = len(encoder_channels)
    if len(decoder_channels) != levels:
        raise ValueError("encoder and decoder need the same number of levels")
    scaling = (True,) * (levels - 1) + (False,)
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
        "block_out_channels": tuple(encoder_channels),
        "decoder_block_out_channels": tuple(decoder_channels),
        "layers_per_block": (layers,) * (levels + 1),
        "decoder_layers_per_block": (layers,) * (levels + 1),
        "spatio_temporal_scaling": scaling, "decoder_spatio_temporal_scaling": scaling,
        "down_block_types": ("LTXVideoDownBlock3D",) * levels,
        "downsample_type": ("conv",) * levels,
        "decoder_inject_noise": (False,) * (levels + 1),
        "upsample_residual": (False,) * levels, "upsample_factor": (1,) * levels,
        "timestep_conditioning": False, "patch_size": patch_size, "patch_size_t": 1,
        "scaling_factor": 1.0, "encoder_causal": True, "decoder_causal": False,
    }


@torch.no_grad()
def init_for_training_(vae: AutoencoderKLLTXVideo, logvar: float = -6.0) -> AutoencoderKLLTXVideo:
    """Start the posterior nearly deterministic (std e^-3 = 0.05, the log-variance channel's
    weights zero). From torch's default init the log-variance is ~0: the sampled latent is mostly
    noise and the decoder is slow to learn to use it (on one fixed batch, L1 after 60 steps:
    0.33 from the default init, 0.21 from this one)."""
    head = vae.encoder.conv_out.conv
    head.weight[vae.config.latent_channels:] = 0
    head.bias[vae.config.latent_channels:] = logvar
    return vae


def clip_crops(images: list[np.ndarray], rng: np.random.Generator, frames: int,
               size: tuple[int, int], crop: tuple[int, int], crops: int) -> np.ndarray:
    """A random clip of a random photo, `crops` random crops of it
    -> uint8 [crops, frames, *crop, 3]."""
    clip, _ = make_clip(images[rng.integers(len(images))], rng, frames, size)
    corners = zip(rng.integers(size[0] - crop[0] + 1, size=crops),
                  rng.integers(size[1] - crop[1] + 1, size=crops))
    return quantise(np.stack([clip[:, y:y + crop[0], x:x + crop[1]] for y, x in corners]))


def vae_losses(vae: AutoencoderKLLTXVideo, video: torch.Tensor, kl_weight: float,
               grad_weight: float, time_weight: float = 0.0) -> Losses:
    """video [B, 3, T, H, W] in [-1, 1] -> {"loss", "l1", "grad", "time", "kl"}."""
    posterior = vae.encode(video).latent_dist
    recon = vae.decode(posterior.sample()).sample                 # [B, 3, T, H, W]
    l1 = (recon - video).abs().mean()
    grad = sum((torch.diff(recon, dim=d) - torch.diff(video, dim=d)).abs().mean() for d in (3, 4))
    # frame-to-frame differences: L1 alone lets a frame blend its neighbours, which loses motion
    time = (torch.diff(recon, dim=2) - torch.diff(video, dim=2)).abs().mean()
    # the log-variance is one channel broadcast to all (LTX); KL per latent element, averaged
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
    loss = l1 + grad_weight * grad + time_weight * time + kl_weight * kl
    return {"loss": loss, "l1": l1, "grad": grad, "time": time, "kl": kl}


@torch.no_grad()
def normalise_latents_(vae: AutoencoderKLLTXVideo, std: float) -> None:
    """Rescale the latent space by 1/std, exactly, inside the weights: the encoder head's mean
    channels are divided by std and its log-variance channel shifted by -2 log(std); the
    decoder's first conv is multiplied by std (a conv with zero padding is linear, so the
    decoder's output is unchanged). The denoiser then sees unit-scale latents, like its noise."""
    head = vae.encoder.conv_out.conv                              # -> latent_channels + 1
    L = vae.config.latent_channels
    head.weight[:L] /= std
    head.bias[:L] /= std
    head.bias[L] -= 2 * math.log(std)
    vae.decoder.conv_in.conv.weight *= std


def reconstruction_metrics(vae: AutoencoderKLLTXVideo, videos: torch.Tensor) -> dict[str, float]:
    """Posterior-mean reconstruction of full clips [N, 3, T, H, W]: L1 and PSNR (on [0, 1])."""
    l1, psnr = [], []
    for video in videos:
        recon = vae.decode(vae.encode(video[None]).latent_dist.mean).sample.clamp(-1, 1)[0]
        l1.append(float((recon - video).abs().mean()))
        psnr.append(float(10 * torch.log10(4 / (recon - video).square().mean())))
    return {"l1": float(np.mean(l1)), "psnr": float(np.mean(psnr))}


def fixed_clips(images: list[np.ndarray], count: int, frames: int, size: tuple[int, int],
                seed: int) -> torch.Tensor:
    """`count` clips from a seeded generator, the same in every evaluation: [N, 3, T, H, W]."""
    rng = np.random.default_rng(seed)
    return torch.stack([to_video(make_clip(images[i % len(images)], rng, frames, size)[0])
                        for i in range(count)])


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the full-run settings of train/README.md."""
    parser = argparse.ArgumentParser(prog="python -m train.vae", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="photo cache (train.data fetch)")
    # lr 5e-4 or more stalls training at the mean colour (train/README.md, stage (a))
    add_loop_arguments(parser, steps=4000, batch=4, lr=1e-4, warmup=100, eval_every=1000)
    parser.add_argument("--latent-channels", type=int, default=32)
    parser.add_argument("--encoder-channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--layers", type=int, default=1, help="resnets per level")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=9, help="frames per training clip")
    parser.add_argument("--size", type=int, nargs=2,
                        default=[DEFAULTS["height"], DEFAULTS["width"]],
                        help="clip height, width (the runtime's default size)")
    parser.add_argument("--crop", type=int, nargs=2, default=[128, 192], help="crop height, width")
    parser.add_argument("--crops-per-clip", type=int, default=2)
    parser.add_argument("--kl-weight", type=float, default=1e-6,
                        help="on the KL averaged per latent element")
    parser.add_argument("--grad-weight", type=float, default=0.1,
                        help="on the edge term")
    parser.add_argument("--time-weight", type=float, default=0.0,
                        help="on the frame-difference (motion) term")
    parser.add_argument("--eval-clips", type=int, default=4,
                        help="held-out clips of the runtime's default length (17 frames)")
    parser.add_argument("--scale-clips", type=int, default=8,
                        help="training clips whose latent std sets the latent scale")
    parser.add_argument("--decoder-from", type=Path,
                        help="fine-tune only the decoder of this trained VAE folder (RUN/vae): "
                             "the encoder, and so the latent space a denoiser was trained on, "
                             "stays as it is; the architecture options are then ignored")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch % args.crops_per_clip:
        parser.error("--batch must be a multiple of --crops-per-clip")

    run = Run(args.out, args)
    torch.manual_seed(args.seed)
    if args.decoder_from:
        vae = AutoencoderKLLTXVideo.from_pretrained(args.decoder_from)
        vae.encoder.requires_grad_(False)
    else:
        vae = init_for_training_(AutoencoderKLLTXVideo(**vae_config(
            args.latent_channels, args.encoder_channels, args.decoder_channels, args.layers,
            args.patch_size)))
    vae.to(run.device)
    size, crop = tuple(args.size), tuple(args.crop)
    train_images = photos(args.cache, "train")
    heldout_images = photos(args.cache, "heldout")
    eval_videos = fixed_clips(heldout_images, args.eval_clips, DEFAULTS["frames"], size,
                              seed=1234).to(run.device)
    with torch.no_grad():
        latent = vae.encode(eval_videos[:1]).latent_dist.mean
    run.log({"parameters": sum(p.numel() for p in vae.parameters()),
             "latent_per_clip": list(latent.shape[1:])})
    clips_per_step = args.batch // args.crops_per_clip
    clips = rendered(lambda rng: clip_crops(train_images, rng, args.frames, size, crop,
                                            args.crops_per_clip),
                     [args.seed, run.first_step], args.workers, ahead=clips_per_step)

    def loss_fn(step: int) -> Losses:
        batch = np.concatenate([next(clips) for _ in range(clips_per_step)])
        return vae_losses(vae, to_video(batch, run.device), args.kl_weight, args.grad_weight,
                          args.time_weight)

    trained = train_loop(run, vae, loss_fn, lambda m: reconstruction_metrics(m, eval_videos))

    trained.eval()
    if not args.decoder_from:                       # a fine-tuned decoder's is normalised already
        with torch.no_grad():
            scale_videos = fixed_clips(train_images, args.scale_clips, DEFAULTS["frames"], size,
                                       seed=args.seed + 1).to(run.device)
            means = torch.cat([trained.encode(v[None]).latent_dist.mean for v in scale_videos])
            std = float(means.std())
            normalise_latents_(trained, std)
        run.log({"latent_std_before": std, "latent_mean_before": float(means.mean())})
    trained.save_pretrained(args.out / "vae")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
