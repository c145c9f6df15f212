"""Benchmark one MobileI2V denoiser forward: tinyi2v (numpy / numba) beside our torch reference.

    python benchmarks/bench_denoiser.py                  # official 300M shapes, 1x128x3x23x40
    python benchmarks/bench_denoiser.py --threads 2 --repeat 3
    python benchmarks/bench_denoiser.py --rounds 3 --model FOLDER    # interleaved, medians

Builds a random-weight model with the official shapes (FP16 on disk, as tinyi2v ships models),
then runs each contender in its own process (so peak RSS is its own) on the same inputs, and
prints seconds per forward, achieved GFLOP/s (1437.4 useful GFLOP at 2760 tokens, spec §10),
peak RSS, and the share of this machine's sgemm rate measured in the same run (best of 5
products, and sustained over 10 s). Not a test: timings on a
shared machine are noisy, so compare the ratios of one run.

The `gemms` contender is not a forward: it runs only the forward's linear layers (1349.6 of the
1437.4 GFLOP), each as tinyi2v's `linear` computes it, with FP32 weights already in memory, in
the forward's order and shapes. Its time is a floor for any forward whose products go through
numpy's BLAS: the rest of the forward (attention, convolution, norms, weight reads) only adds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = (3, 23, 40)                 # 1280x720x17 -> 2760 tokens
USEFUL_GFLOP = 1437.4              # per forward at 2760 tokens, t/flow rows deduplicated (§10)


def worker_env(threads: int) -> dict[str, str]:
    """The environment of every worker process: `threads` for each thread pool, and what
    `import tinyi2v` sets when it comes before numpy (see tinyi2v/__init__.py; workers import
    numpy first)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
            "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")}


def inputs():
    import numpy as np
    from tinyi2v.rng import gaussian_noise
    from tinyi2v.sampler import guide_mask

    x = gaussian_noise(0, (1, 128) + GRID)
    return x, np.array([988.27136], np.float32), guide_mask(x.shape), np.array([2.0], np.float32)


def build_model(folder: Path, seed: int) -> None:
    """Random weights with the official 300M shapes, written as an FP16 component folder."""
    import numpy as np
    from tinyi2v.denoiser import official_config, param_shapes
    from tinyi2v.weights import save_component

    cfg = official_config()
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in param_shapes(cfg).items():
        fan_in = int(np.prod(shape[1:])) or 1
        std = 0.2 if name.endswith(("scale_shift_table", "bias")) else fan_in ** -0.5
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        tensors[name] = a + 1 if name.endswith("norm.weight") else a
    save_component(folder, cfg, tensors, dtype="F16")


def dense_products(model: str):
    """A call that runs the forward's linear layers only (see the module docstring): random
    FP32 inputs and weights (distinct per layer, as the forward's are) of the checkpoint's
    shapes; products on [B*N, in] rows, in forward order."""
    import numpy as np

    from tinyi2v.denoiser import linear, param_shapes
    from tinyi2v.weights import Component

    cfg = Component(model).config
    shapes = param_shapes(cfg)
    names = ["x_embedder.proj.weight"] + [f"blocks.{i}.{layer}" for i in range(cfg["num_blocks"])
                                          for layer in ("attn.qkv.weight", "attn.proj.weight",
                                                        "mlp.inverted_conv.conv.weight",
                                                        "mlp.point_conv.conv.weight")]
    names.append("final_layer.linear.weight")
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shapes[n], np.float32) for n in names]
    rows = int(np.prod(GRID))
    x = {w.shape[1]: rng.standard_normal((rows, w.shape[1]), np.float32) for w in weights}

    def call():
        for w in weights:
            y = linear(x[w.shape[1]], w)                      # [N, in] -> [N, out]
        return y
    return call, sum(2 * rows * w.size for w in weights) / 1e9


def worker(kind: str, model: str, repeat: int, out: str) -> None:
    """Run `repeat` forwards in this process; print one JSON line with the timings."""
    if kind == "sgemm":
        return print(json.dumps({"burst": sgemm_gflops(), "sustained": sgemm_gflops(10.0)}))
    if kind == "gemms":
        call, gflop = dense_products(model)
        return time_calls(call, repeat, out, gflop=gflop)
    x, t, mask, flow = inputs()
    if kind == "torch":
        import torch

        from tinyi2v.weights import Component
        from train.mobilei2v_torch import MobileI2VDenoiser

        comp = Component(model)
        net = MobileI2VDenoiser.from_config(comp.config)
        net.load_state_dict({k: torch.from_numpy(comp[k].copy()) for k in comp})
        net.eval()
        args = [torch.from_numpy(a) for a in (x, t, mask, flow)]

        def forward():
            with torch.inference_mode():
                return net(*args).numpy()
    else:
        import tinyi2v
        from tinyi2v import ops

        ops.set_backend(kind)
        f = tinyi2v.load_denoiser(model)

        def forward():
            return f(x, t, mask, flow)
    time_calls(forward, repeat, out)


def time_calls(call, repeat: int, out: str, **extra) -> None:
    """Time `repeat` calls, save the last result to `out` and print the JSON line the parent
    process reads, with `extra` in it (shared by the benchmark scripts)."""
    import numpy as np

    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a forked and
    # exec'd child, so every worker would report at least the memory of the process that
    # started it
    from tinyi2v.bench import peak_rss_mb

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    np.save(out, result)
    print(json.dumps({"times": times, "peak_rss_mb": peak_rss_mb(), **extra}))


def sgemm_gflops(sustain_s: float = 0.0) -> float:
    """This machine's numpy FP32 matmul rate on the denoiser's biggest GEMM shape (2760x1152 @
    1152x5760): the best of 5 products (a burst, ~0.2 s), or with `sustain_s` the average over
    back-to-back products for that long. On a shared VM single products vary 2x within seconds
    (126-303 GFLOP/s in one 20-s run), so a best-of-5 catches the host's quiet moments, which a
    10-s forward cannot have throughout; the sustained rate is what a forward can reach."""
    import numpy as np

    a = np.random.rand(2760, 1152).astype(np.float32)
    b = np.random.rand(1152, 5760).astype(np.float32)
    a @ b
    if not sustain_s:
        return 2 * 2760 * 1152 * 5760 / min(_timed(lambda: a @ b) for _ in range(5)) / 1e9
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < sustain_s:
        a @ b
        count += 1
    return count * 2 * 2760 * 1152 * 5760 / (time.perf_counter() - start) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_round(env: dict[str, str], model: str, contenders: list[str], repeat: int,
              tmp: str) -> tuple[dict[str, float], dict[str, dict], dict[str, str]]:
    """The sgemm rates (burst, sustained), then each contender in its own process:
    (rates, timings, output files)."""
    # sgemm in a child too, so it runs under the same thread settings
    rates = json.loads(subprocess.run([sys.executable, __file__, "--worker", "sgemm"], env=env,
                                      capture_output=True, text=True, check=True).stdout)
    results, outputs = {}, {}
    for kind in contenders:
        out = str(Path(tmp) / f"{kind}.npy")
        run = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", model,
                              "--repeat", str(repeat), "--out", out],
                             env=env, capture_output=True, text=True)
        if run.returncode:
            print(f"{kind}: failed\n{run.stderr[-2000:]}")
            continue
        results[kind] = json.loads(run.stdout.strip().splitlines()[-1])
        outputs[kind] = out
    return rates, results, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=2, help="forwards per contender (first is warm-up)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="sgemm + every contender, this many times in turn; the summary is the "
                         "median of the rounds' ratios (a VM's speed drifts within minutes)")
    ap.add_argument("--contenders", default="numba,numpy,torch,gemms")
    ap.add_argument("--model", help="an existing transformer folder (default: build a random one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.repeat, args.out)

    import numpy as np

    env = worker_env(args.threads)
    ratios: dict[str, list[tuple[float, float, float]]] = {}  # kind -> [(% burst, % sust, vs torch)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            model = str(Path(tmp) / "transformer")
            print("building random-weight model with the official 300M shapes (FP16) ...")
            build_model(Path(model), seed=0)
        for r in range(args.rounds):
            rates, results, outputs = run_round(env, model, args.contenders.split(","),
                                                args.repeat, tmp)
            print(f"\nround {r + 1}/{args.rounds}: {os.cpu_count()} cores, {args.threads} "
                  f"threads; numpy sgemm on 2760x1152 @ 1152x5760: {rates['burst']:.0f} GFLOP/s "
                  f"burst (best of 5), {rates['sustained']:.0f} sustained (10 s); one forward, "
                  f"batch 1, {GRID[0]}x{GRID[1]}x{GRID[2]} = 2760 tokens, {USEFUL_GFLOP} GFLOP")
            print(f"{'contender':<10} {'first s':>8} {'best s':>8} {'GFLOP/s':>8} {'% burst':>8} "
                  f"{'% sust.':>8} {'peak RSS MB':>12} {'vs torch':>9} {'max |diff|':>11}")
            ref = np.load(outputs["torch"]) if "torch" in outputs else None
            best = {kind: min(res["times"][1:] or res["times"]) for kind, res in results.items()}
            for kind, res in results.items():
                ratio = best[kind] / best["torch"] if "torch" in best else float("nan")
                diff = float(np.abs(np.load(outputs[kind]) - ref).max()) \
                    if ref is not None and kind != "gemms" else float("nan")
                gflop = res.get("gflop", USEFUL_GFLOP)       # gemms: its own products only
                burst, sustained = (100 * gflop / best[kind] / rates[k]
                                    for k in ("burst", "sustained"))
                ratios.setdefault(kind, []).append((burst, sustained, ratio))
                print(f"{kind:<10} {res['times'][0]:8.2f} {best[kind]:8.2f} "
                      f"{gflop / best[kind]:8.1f} {burst:7.0f}% {sustained:7.0f}% "
                      f"{res['peak_rss_mb']:12.0f} {ratio:8.2f}x {diff:11.2e}")
    if args.rounds > 1:
        print(f"\nmedian of {args.rounds} rounds (min-max):")
        for kind, triples in ratios.items():
            burst, sustained, ratio = np.array(triples).T
            print(f"{kind:<10} {np.median(burst):5.0f}% of burst sgemm ({burst.min():.0f}-"
                  f"{burst.max():.0f}), {np.median(sustained):5.0f}% of sustained "
                  f"({sustained.min():.0f}-{sustained.max():.0f}), {np.median(ratio):.2f}x torch "
                  f"({ratio.min():.2f}-{ratio.max():.2f})")


if __name__ == "__main__":
    main()
