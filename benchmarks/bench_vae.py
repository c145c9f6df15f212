"""Benchmark the video VAEs: tinyi2v (numba / numpy) beside diffusers/torch, at MobileI2V's 720p.

    python benchmarks/bench_vae.py --repeat 1             # all tasks, ~15 min on 2 cores
    python benchmarks/bench_vae.py --tasks decode --contenders numba,torch

Tasks: `encode` one 1280x720 frame (the guide image) with the full-size LTX-Video 0.9.0 VAE;
`decode` a 1x128x3x23x40 latent (17 frames at 1280x736) with its decoder; `turbo` the same latent
with the Turbo-VAED decoder (its reference class lives in a diffusers fork, so torch there is our
independent whole-tensor implementation, train/turbo_vaed_torch.py). The models get random
weights with the official shapes, written FP16 to a temporary folder (as tinyi2v ships models);
torch loads the same weights as float32, as MobileI2V runs its VAE, and materialises only the half
of the autoencoder that the task uses. Each contender runs in its own process, so peak RSS
(weights included) is its own. Not a test: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_denoiser import sgemm_gflops, time_calls, worker_env  # noqa: E402

FRAME = (1, 3, 1, 720, 1280)       # the guide image as a one-frame video
LATENT = (1, 128, 3, 23, 40)       # 17 frames of 1280x736 (cropped to 720 by the pipeline)
TASKS = {"encode": "encode one 720x1280 frame (LTX 0.9.0 encoder)",
         "decode": "decode 1x128x3x23x40 -> 17x736x1280 (LTX 0.9.0 decoder)",
         "turbo": "decode 1x128x3x23x40 -> 17x736x1280 (Turbo-VAED decoder)"}


def random_tensors(shapes: dict, seed: int) -> dict:
    """Conv kernels N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm gains 1 + N(0, 0.1^2)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(fan_in ** -0.5 if fan_in else 0.1)
        tensors[name] = a + 1 if name.endswith("norm3.weight") else a
    return tensors


def build_model(folder: Path, task: str, seed: int) -> None:
    """A random-weight vae/ folder with the official shapes, FP16."""
    from tinyi2v.weights import save_component

    if task == "turbo":
        from tinyi2v.vae import turbo_vaed as module
    else:
        from tinyi2v.vae import ltx as module
    cfg = module.official_config()
    save_component(folder, cfg, random_tensors(module.param_shapes(cfg), seed), dtype="F16")


def inputs(task: str):
    import numpy as np

    rng = np.random.default_rng(1)
    if task == "encode":
        return rng.uniform(-1, 1, FRAME).astype(np.float32)
    return rng.standard_normal(LATENT, dtype=np.float32)


def worker(kind: str, task: str, model: str, repeat: int, out: str) -> None:
    """Run `repeat` calls in this process; print one JSON line with the timings."""
    import numpy as np

    if kind == "sgemm":
        return print(json.dumps({"gflops": sgemm_gflops()}))
    if kind == "build":
        return build_model(Path(model), task, seed=0)
    x = inputs(task)
    if kind == "torch" and task == "turbo":
        import torch

        from train.turbo_vaed_torch import TurboVAEDDecoderTorch

        net = TurboVAEDDecoderTorch.from_component(model)   # FP16 weights upcast to float32
        xt = torch.from_numpy(x)

        def call():
            with torch.inference_mode():
                return net(xt).numpy()
    elif kind == "torch":
        import torch
        from diffusers import AutoencoderKLLTXVideo

        from tinyi2v.weights import Component

        comp = Component(model)
        cfg = {k: v for k, v in comp.config.items() if not k.startswith("_")}
        with torch.device("meta"):                      # materialise only the half we run
            net = AutoencoderKLLTXVideo(**cfg)
        half = "encoder" if task == "encode" else "decoder"
        getattr(net, half).load_state_dict(
            {k[len(half) + 1:]: torch.from_numpy(np.array(comp[k])) for k in comp
             if k.startswith(half + ".")}, assign=True)
        net.eval()
        xt = torch.from_numpy(x)

        def call():
            with torch.inference_mode():
                if task == "encode":
                    return net.encode(xt).latent_dist.mean.numpy()
                return net.decode(xt).sample.numpy()
    else:
        from tinyi2v import ops
        from tinyi2v.vae import load_vae

        ops.set_backend(kind)
        vae = load_vae(model)

        def call():
            return vae.encode(x)[0] if task == "encode" else vae.decode(x)
    time_calls(call, repeat, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1, help="calls per contender")
    ap.add_argument("--contenders", default="numba,numpy,torch")
    ap.add_argument("--tasks", default="encode,decode,turbo")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.task, args.model, args.repeat, args.out)

    import numpy as np

    env = worker_env(args.threads)
    rate = json.loads(subprocess.run([sys.executable, __file__, "--worker", "sgemm"], env=env,
                                     capture_output=True, text=True, check=True).stdout)["gflops"]
    print(f"machine: {os.cpu_count()} cores, {args.threads} threads; numpy sgemm "
          f"{rate:.0f} GFLOP/s on 2760x1152 @ 1152x5760")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            contenders = args.contenders.split(",")
            if task == "turbo" and importlib.util.find_spec("tinyi2v.vae.turbo_vaed") is None:
                print("turbo: skipped (tinyi2v.vae.turbo_vaed does not exist yet)")
                continue
            model = Path(tmp) / ("turbo" if task == "turbo" else "ltx")   # encode + decode share
            if not model.exists():
                print(f"{task}: building a random-weight model with the official shapes (FP16) ...")
                subprocess.run([sys.executable, __file__, "--worker", "build", "--task", task,
                                "--model", str(model)], check=True)   # keeps this process small
            outputs = {}
            for kind in contenders:
                out = str(Path(tmp) / f"{task}-{kind}.npy")
                run = subprocess.run([sys.executable, __file__, "--worker", kind, "--task", task,
                                      "--model", str(model), "--repeat", str(args.repeat),
                                      "--out", out], env=env, capture_output=True, text=True,
                                     check=False)
                if run.returncode:
                    print(f"{task} {kind}: failed\n{run.stderr[-2000:]}")
                    continue
                result = json.loads(run.stdout.strip().splitlines()[-1])
                outputs[kind] = out
                rows.append((task, kind, result))
                print(f"{task} {kind}: {min(result['times']):.1f} s, "
                      f"{result['peak_rss_mb']:.0f} MB", flush=True)
            ref = np.load(outputs["torch"]) if "torch" in outputs else None
            for i, (t, kind, result) in enumerate(rows):
                if t == task:
                    diff = float(np.abs(np.load(outputs[kind]) - ref).max()) \
                        if ref is not None else float("nan")
                    rows[i] = (t, kind, {**result, "diff": diff})
    print(f"\n{'task':<8} {'contender':<10} {'best s':>8} {'peak RSS MB':>12} {'vs torch':>9} "
          f"{'max |diff|':>11}")
    for task, kind, r in rows:
        torch_best = [min(q["times"]) for t, k, q in rows if t == task and k == "torch"]
        ratio = min(r["times"]) / torch_best[0] if torch_best else float("nan")
        print(f"{task:<8} {kind:<10} {min(r['times']):8.1f} {r['peak_rss_mb']:12.0f} "
              f"{ratio:8.2f}x {r['diff']:11.2e}")
    print("\n" + "\n".join(f"{task}: {TASKS[task]}" for task in args.tasks.split(",")))


if __name__ == "__main__":
    main()
