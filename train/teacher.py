"""Stage (b): the flow-matching teacher, a small MobileI2V denoiser on the frozen VAE's latents.

    python -m train.teacher --latents runs/latents --out runs/teacher --max-minutes 35

Architecture: `MobileI2VDenoiser` (train/mobilei2v_torch.py, the official key names) at hidden
144 = 2 heads of 72 (upstream hard-codes head size 72), FFN 2.5x (360), 8 blocks with softmax
attention in blocks 3 and 7: the official model has it in blocks 7 and 15, the last block of
each half. 2.4 M parameters.

Training, as upstream (train_scripts/train_i2v.py; spec §4.12, §6, §7):
  x0     = a posterior sample of the clip's latent (mean + std * eps, fresh at every use)
  sigma  ~ logit-normal(0, 1), i.e. sigmoid(N(0, 1)) (shift 1), one per clip
  x      = (1 - sigma) x0 + sigma noise, then latent frame 0 <- the guide latent (frame 0 encoded
           on its own, posterior mean: what the runtime writes)
  v      = model(x, 1000 sigma, cond_mask, flow_score); cond_mask = 1 on frame-0 tokens, which
           therefore see timestep 0
  loss   = MSE(v, noise - x0) over all tokens, the guide frame included (upstream; its target is
           unpredictable there, so that part of the loss stays near 1: the log also reports
           `noisy`, the MSE over frames 1+)
AdamW, warm-up then cosine decay, gradient clipping at 1, EMA 0.999 (evaluated and exported).

The product: RUN/transformer/ (tinyi2v component, FP32, the EMA weights) and
RUN/scheduler/scheduler_config.json (shift-3 Euler, TEACHER_STEPS steps).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyi2v.denoiser import official_config
from tinyi2v.sampler import guide_mask
from train.common import (EMA, Losses, Run, add_loop_arguments, load_component_state,
                          save_torch_component, train_loop)
from train.latents import load_latents
from train.mobilei2v_torch import MobileI2VDenoiser

TEACHER_STEPS = 30          # the teacher's sampling steps: the published MobileI2V sampler (30
                            # shift-3 Euler steps), its exported schedule and the trajectories the
                            # student is distilled from


def teacher_config(in_channels: int, hidden_size: int = 144, num_blocks: int = 8) -> dict:
    """The runtime transformer config: softmax attention in the last block of each half (the
    official 16 blocks have it in 7 and 15), FFN 2.5x hidden as upstream."""
    return official_config(in_channels=in_channels, hidden_size=hidden_size,
                           num_blocks=num_blocks,
                           softmax_blocks=(num_blocks // 2 - 1, num_blocks - 1),
                           mlp_hidden_size=int(2.5 * hidden_size))


@torch.no_grad()
def init_for_training_(model: MobileI2VDenoiser) -> MobileI2VDenoiser:
    """Sana's initialisation (Linear: Xavier-uniform, zero bias; the patch embedding Xavier; the
    timestep/flow MLPs and their modulation heads N(0, 0.02); scale-shift tables N(0, 1/D)), plus
    DiT's zero output layer, so training starts from v = 0. Convolutions keep torch's default."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(model.x_embedder.proj.weight.view(model.hidden_size, -1))
    for embedder, head in ((model.t_embedder, model.t_block), (model.flow_embedder, model.flow_block)):
        for layer in (embedder.mlp[0], embedder.mlp[2], head[1]):
            nn.init.normal_(layer.weight, std=0.02)
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):
            param.copy_(torch.randn_like(param) / model.hidden_size ** 0.5)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    return model


def cond_mask_for(latent: torch.Tensor) -> torch.Tensor:
    """[1, N]: 1 on latent frame 0 (the runtime sampler's `guide_mask`)."""
    return torch.from_numpy(guide_mask(tuple(latent.shape)))


def flow_matching_losses(model: nn.Module, data: Mapping[str, torch.Tensor], index: torch.Tensor,
                         generator: torch.Generator | None = None) -> Losses:
    """Upstream's training loss on the clips `index` of a latent dataset (see the module doc)."""
    mean, guide = data["mean"][index], data["guide"][index]       # [B, C, T, h, w], [B, C, 1, h, w]
    B = mean.shape[0]
    device = mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device)
    x0 = mean + torch.exp(0.5 * data["logvar"][index]) * eps
    noise = torch.randn(mean.shape, generator=generator, device=device)
    sigma = torch.sigmoid(torch.randn(B, generator=generator, device=device))  # logit-normal(0, 1)
    s = sigma.view(B, 1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    x[:, :, :1] = guide
    v = model(x, 1000 * sigma, cond_mask_for(x), data["flow"][index])
    error = (v - (noise - x0)).square()
    return {"loss": error.mean(), "noisy": error[:, :, 1:].mean()}


def save_denoiser(out: Path, model: MobileI2VDenoiser, config: Mapping,
                  scheduler: Mapping) -> None:
    """RUN/transformer (FP32 tinyi2v component) and RUN/scheduler/scheduler_config.json."""
    save_torch_component(out / "transformer", model, config)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1) + "\n")


def load_denoiser(path: Path) -> tuple[MobileI2VDenoiser, dict]:
    """A transformer component folder (any dtype on disk) as a float32 torch model + config."""
    config, state = load_component_state(path)
    model = MobileI2VDenoiser.from_config(config)
    model.load_state_dict(state)
    return model, config


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the full-run settings of train/README.md."""
    parser = argparse.ArgumentParser(prog="python -m train.teacher",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=Path, required=True, help="train.latents output")
    add_loop_arguments(parser, steps=3000, batch=8, lr=5e-4, warmup=200, eval_every=500)
    parser.add_argument("--hidden", type=int, default=144, help="a multiple of 72")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--init-from", type=Path,
                        help="start from this transformer folder's weights (e.g. "
                             "weights/tinyi2v-teacher/transformer; its config replaces --hidden "
                             "and --blocks): continues a teacher whose checkpoint is not at hand, "
                             "as on a GPU machine where only the repository travels")
    parser.add_argument("--compile", action="store_true",
                        help="compile the blocks with torch.compile (fuses their elementwise "
                             "chains; on an H200 0.25 s a batch-128 step against 0.33 eager, "
                             "after ~35 s of compiling; on a CPU no faster); a frame it cannot "
                             "compile runs eagerly")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    run = Run(args.out, args)
    train = load_latents(args.latents / "train.npz", run.device)
    heldout = load_latents(args.latents / "heldout.npz", run.device)
    torch.manual_seed(args.seed)
    if args.init_from:
        model, config = load_denoiser(args.init_from)
    else:
        config = teacher_config(train["mean"].shape[1], args.hidden, args.blocks)
        model = init_for_training_(MobileI2VDenoiser.from_config(config))
    model.to(run.device)
    run.log({"parameters": sum(p.numel() for p in model.parameters()),
             "clips": len(train["flow"]), "latent": list(train["mean"].shape[1:])})

    generator = torch.Generator(run.device).manual_seed(args.seed * 1000 + run.first_step)
    rng = np.random.default_rng([args.seed, run.first_step])

    ema = EMA(model, args.ema)                # copied before compiling: evaluation stays eager
    if args.compile:
        # each block compiled in place (same parameters and key names); the embedders before
        # them run eagerly, as their shapes follow the number of distinct sigmas in the batch
        torch._dynamo.config.suppress_errors = True      # a frame it cannot compile runs eagerly
        for block in model.blocks:
            block.compile()

    def loss_fn(step: int) -> Losses:
        index = torch.from_numpy(rng.integers(len(train["flow"]), size=args.batch))
        return flow_matching_losses(model, train, index.to(run.device), generator)

    def evaluate(m: nn.Module) -> dict[str, float]:
        # the same noise, sigmas and posterior samples at every evaluation: comparable numbers
        # (on one device: a CUDA generator draws other numbers than the CPU's)
        eval_generator = torch.Generator(run.device).manual_seed(1234)
        clips = torch.arange(min(args.eval_clips, len(heldout["flow"])), device=run.device)
        losses = [flow_matching_losses(m, heldout, part, eval_generator)
                  for part in clips.split(args.batch)]
        return {k: float(np.mean([float(l[k]) for l in losses])) for k in losses[0]}

    trained = train_loop(run, model, loss_fn, evaluate, ema)
    save_denoiser(args.out, trained, config,
                  {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "shift": 3.0, "num_inference_steps": TEACHER_STEPS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
