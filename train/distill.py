"""Stage (c): the two-step student, by time-step distillation of the teacher's trajectories.

    python -m train.distill --teacher runs/teacher --latents runs/latents --out runs/student \\
        --max-minutes 18

1. Trajectories (no gradients): for --trajectories guide latents and flow scores of training
   clips, the teacher's own Euler sampler (its scheduler: TEACHER_STEPS shift-3 steps, the guide
   written into latent frame 0 before and after every step, exactly as tinyi2v.sampler does)
   from seeded noise: the start x(1), the state x(s_mid) on its path (an Euler path is straight
   within a step, so the state at any sigma is exact) and the end x(0). Saved to
   RUN/trajectories.pt, so a resumed run does not recompute them.
2. The student starts as a copy of the teacher and is trained to reproduce the teacher's end in
   two Euler steps with the fixed sigmas [1, s_mid, 0], one regression per step, each on the
   velocity that would land that step exactly on the teacher's state:
     step 1  v1 = S(x(1), 1);  x_m = x(1) + (s_mid - 1) v1
             loss1 = MSE(v1, (x(1) - x_T(s_mid)) / (1 - s_mid))
     step 2  v2 = S(x_m, s_mid), from the student's own x_m (detached): the state it will
             really be in at inference, so step 2 learns to correct step 1's error
             loss2 = MSE(v2, (x_m - x_T(0)) / s_mid)
   loss = loss1 + loss2, over the tokens of frames 1+ (the sampler overwrites frame 0 with the
   guide, so the student's output there is never used). Each velocity MSE is the endpoint error
   of its step divided by the step length squared: both terms have the scale of the teacher's
   flow-matching loss. Step 1 pins the student to the teacher's path at s_mid, rather than any
   two-step route to the end, which keeps step 2 a well-posed regression.
   The paper's adversarial and distribution-matching losses are not used (no discriminator, no
   second "fake score" network: too costly for a CPU budget); the student can therefore only
   approach the teacher, never exceed it.

Evaluation: held-out guides with fixed noise; `endpoint_mse` is the MSE (frames 1+) between the
student's 2-step result and the teacher's TEACHER_STEPS-step result. At step 0 the student is the
teacher, so the first value is the teacher's own 2-step error: the baseline to beat.

The product: RUN/transformer/ and RUN/scheduler/scheduler_config.json with the explicit sigmas
[1, s_mid, 0] (and the teacher's schedule, for comparison).
"""
from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyi2v.sampler import shifted_sigmas
from train.common import Losses, Run, add_loop_arguments, train_loop
from train.latents import load_latents
from train.teacher import cond_mask_for, load_denoiser, save_denoiser


def euler(model: nn.Module, noise: torch.Tensor, guide: torch.Tensor, flow: torch.Tensor,
          sigmas: Sequence[float], mid: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The runtime's Euler sampler in torch, batched with a flow score per clip.

    noise [B, C, T, h, w] (frame 0 is replaced by guide [B, C, 1, h, w]); sigmas from 1 to 0.
    -> (the state at sigma = mid on the Euler path, the end state)."""
    x, mask, state_at_mid = noise.clone(), cond_mask_for(noise), None
    B = x.shape[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x[:, :, :1] = guide
        v = model(x, torch.full((B,), 1000.0 * sigma), mask, flow)
        if state_at_mid is None and sigma_next <= mid:
            state_at_mid = x + (mid - sigma) * v
            state_at_mid[:, :, :1] = guide
        x = x + (sigma_next - sigma) * v
    x[:, :, :1] = guide
    return state_at_mid, x


@torch.no_grad()
def trajectories(teacher: nn.Module, guide: torch.Tensor, flow: torch.Tensor, frames: int,
                 sigmas: Sequence[float], mid: float, batch: int, generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """Teacher runs of `frames` latent frames from seeded noise for every guide [N, C, 1, h, w]
    with its flow [N], in batches -> {"noise" (guide in frame 0), "mid", "end", "guide", "flow"}."""
    N, C, _, h, w = guide.shape
    noise = torch.randn((N, C, frames, h, w), generator=generator).to(guide.device)
    noise[:, :, :1] = guide
    mids, ends = [], []
    for part in torch.arange(len(flow), device=guide.device).split(batch):
        state_at_mid, end = euler(teacher, noise[part], guide[part], flow[part], sigmas, mid)
        mids.append(state_at_mid)
        ends.append(end)
    return {"noise": noise, "mid": torch.cat(mids), "end": torch.cat(ends), "guide": guide,
            "flow": flow}


def distill_losses(student: nn.Module, data: dict[str, torch.Tensor], index: torch.Tensor,
                   mid: float) -> Losses:
    """The two regressions of the module doc on the trajectories `index`."""
    x1, guide, flow = data["noise"][index], data["guide"][index], data["flow"][index]
    B, mask = x1.shape[0], cond_mask_for(x1)
    v1 = student(x1, torch.full((B,), 1000.0), mask, flow)
    step1 = (v1 - (x1 - data["mid"][index]) / (1 - mid))[:, :, 1:].square().mean()
    x_mid = (x1 + (mid - 1) * v1).detach()
    x_mid[:, :, :1] = guide
    v2 = student(x_mid, torch.full((B,), 1000.0 * mid), mask, flow)
    step2 = (v2 - (x_mid - data["end"][index]) / mid)[:, :, 1:].square().mean()
    return {"loss": step1 + step2, "step1": step1, "step2": step2}


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the full-run settings of train/README.md."""
    parser = argparse.ArgumentParser(prog="python -m train.distill",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="train.teacher output")
    parser.add_argument("--latents", type=Path, required=True, help="train.latents output")
    add_loop_arguments(parser, steps=500, batch=8, lr=1e-4, warmup=50, eval_every=100)
    parser.add_argument("--trajectories", type=int, default=384)
    parser.add_argument("--mid-sigma", type=float, default=0.75,
                        help="the student's middle sigma (0.75: shift 3 applied to 0.5)")
    parser.add_argument("--eval-clips", type=int, default=16)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    run = Run(args.out, args)
    teacher, config = load_denoiser(args.teacher / "transformer")
    teacher.eval().requires_grad_(False).to(run.device)
    schedule = json.loads((args.teacher / "scheduler" / "scheduler_config.json").read_text())
    teacher_sigmas = shifted_sigmas(schedule["num_inference_steps"], schedule["shift"]).tolist()
    mid = args.mid_sigma
    train = load_latents(args.latents / "train.npz", run.device)
    heldout = load_latents(args.latents / "heldout.npz", run.device)
    frames = train["mean"].shape[2]                              # latent frames of a clip

    path, start, start_cpu = args.out / "trajectories.pt", run.elapsed, run.cpu_seconds
    if args.resume and path.exists():
        data = torch.load(path, map_location=run.device, weights_only=True)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        index = torch.randint(len(train["flow"]), (args.trajectories,),
                              generator=generator).to(run.device)
        data = trajectories(teacher, train["guide"][index], train["flow"][index], frames,
                            teacher_sigmas, mid, args.batch, generator)
        torch.save(data, path)
    run.log({"trajectories": len(data["flow"]), "teacher_steps": len(teacher_sigmas) - 1,
             "trajectory_seconds": run.elapsed - start,
             "trajectory_cpu_seconds": run.cpu_seconds - start_cpu, "seconds": run.elapsed})
    n = min(args.eval_clips, len(heldout["flow"]))
    reference = trajectories(teacher, heldout["guide"][:n], heldout["flow"][:n], frames,
                             teacher_sigmas, mid, args.batch, torch.Generator().manual_seed(1234))

    def evaluate(m: nn.Module) -> dict[str, float]:
        _, end = euler(m, reference["noise"], reference["guide"], reference["flow"],
                       [1.0, mid, 0.0], mid)
        return {"endpoint_mse": float((end - reference["end"])[:, :, 1:].square().mean())}

    student = copy.deepcopy(teacher).requires_grad_(True)
    rng = np.random.default_rng([args.seed, run.first_step])

    def loss_fn(step: int) -> Losses:
        index = torch.from_numpy(rng.integers(len(data["flow"]), size=args.batch))
        return distill_losses(student, data, index.to(run.device), mid)

    trained = train_loop(run, student, loss_fn, evaluate)
    save_denoiser(args.out, trained, config,
                  {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "shift": schedule["shift"], "sigmas": [1.0, mid, 0.0],
                   "distilled_from": {"num_inference_steps": schedule["num_inference_steps"],
                                      "shift": schedule["shift"], "sigmas": teacher_sigmas}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
