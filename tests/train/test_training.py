"""The training stages (train/vae.py, latents.py, teacher.py, distill.py, export.py) at tiny
sizes on synthetic photos: every stage runs and logs, the teacher learns, the export is a model
folder the numpy runtime animates with, and the runtime matches torch on the exported weights.

Tiny geometry: patch 4 + two levels = 8x spatial, 2x temporal compression, 4 latent channels;
clips of 5 frames at 32x48 -> latents [4, 3, 4, 6] (72 tokens); a 1-head, 2-block denoiser."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_data import synthetic_photo  # noqa: E402
from tinyi2v.denoiser import load_denoiser as load_numpy_denoiser  # noqa: E402
from tinyi2v.pipeline import Pipeline  # noqa: E402
from tinyi2v.sampler import guide_mask, sample  # noqa: E402
from tinyi2v.vae import load_vae  # noqa: E402
from tinyi2v.weights import Component  # noqa: E402
from train import distill, export, latents, teacher, vae  # noqa: E402
from train.data import Photo, write_manifest  # noqa: E402
from train.mobilei2v_torch import init_random_  # noqa: E402

SIZE = ["32", "48"]
LOOP = ["--threads", "1", "--log-every", "2"]
PARITY = 1e-4     # max abs difference, numpy runtime vs torch on the same FP16-rounded weights


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run) if "loss" in r]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A photo cache as `train.data fetch` leaves it: 4 training and 2 held-out photos."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cache")
    (root / "photos").mkdir()
    rows = []
    for i in range(6):
        file = f"photos/{i}.png"
        Image.fromarray(synthetic_photo(120, 180, seed=i)).save(root / file)
        rows.append(Photo(f"{i:064x}", file, "synthetic", "0", file, "CC0-1.0", "test",
                          "test", 180, 120, "train" if i < 4 else "heldout"))
    write_manifest(root / "manifest.json", rows)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache: Path) -> Path:
    """Every stage, a few steps each, in one folder of run folders."""
    root = tmp_path_factory.mktemp("runs")
    assert vae.main(["--cache", str(cache), "--out", str(root / "vae"), "--steps", "3",
                     "--batch", "2", "--latent-channels", "4", "--encoder-channels", "8", "8",
                     "--decoder-channels", "8", "8", "--patch-size", "4", "--frames", "5",
                     "--size", *SIZE, "--crop", "32", "32", "--eval-clips", "1",
                     "--scale-clips", "2", *LOOP]) == 0
    assert latents.main(["--cache", str(cache), "--vae", str(root / "vae" / "vae"),
                         "--out", str(root / "latents"), "--clips", "8", "--heldout-clips", "4",
                         "--frames", "5", "--size", *SIZE, "--threads", "1"]) == 0
    assert teacher.main(["--latents", str(root / "latents"), "--out", str(root / "teacher"),
                         "--hidden", "72", "--blocks", "2", "--steps", "4", "--batch", "4",
                         "--eval-clips", "4", *LOOP]) == 0
    assert distill.main(["--teacher", str(root / "teacher"), "--latents", str(root / "latents"),
                         "--out", str(root / "student"), "--trajectories", "8", "--steps", "4",
                         "--batch", "4", "--eval-clips", "2", "--eval-every", "2", *LOOP]) == 0
    export.export(root / "vae" / "vae", root / "student", root / "model",
                  {"height": 32, "width": 48, "frames": 5, "fps": 8, "motion": 2.0}, max_mb=40)
    return root


@pytest.fixture(scope="module")
def random_teacher(runs: Path) -> Path:
    """A teacher run folder with random fixture-scale weights (outputs of order 1): a few
    training steps leave a near-zero output layer, which would make distillation trivial and any
    parity comparison pass."""
    model, config = teacher.load_denoiser(runs / "teacher" / "transformer")
    init_random_(model, seed=3)
    schedule = json.loads((runs / "teacher" / "scheduler" / "scheduler_config.json").read_text())
    teacher.save_denoiser(runs / "random-teacher", model, config, schedule)
    return runs / "random-teacher"


def test_every_stage_logs_and_summarises(runs: Path) -> None:
    for stage, logged in (("vae", [2, 3]), ("teacher", [2, 4]), ("student", [2, 4])):
        summary = json.loads((runs / stage / "summary.json").read_text())
        assert summary["steps"] == logged[-1] and summary["stopped_by"] == "steps"
        assert summary["median_step_seconds"] > 0
        assert [r["step"] for r in read_log(runs / stage) if "loss" in r] == logged
        assert all(np.isfinite(losses(runs / stage)))
    assert "eval_psnr" in read_log(runs / "vae")[-2]
    assert any("eval_endpoint_mse" in r for r in read_log(runs / "student"))
    data = np.load(runs / "latents" / "train.npz")
    assert data["mean"].shape == (8, 4, 3, 4, 6) and data["guide"].shape == (8, 4, 1, 4, 6)
    assert data["logvar"].shape == (8, 1, 3, 4, 6) and data["flow"].shape == (8,)
    schedule = json.loads((runs / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert schedule["sigmas"] == [1.0, 0.75, 0.0]
    assert schedule["distilled_from"]["num_inference_steps"] == teacher.TEACHER_STEPS


def test_vae_latents_have_unit_scale(runs: Path, cache: Path) -> None:
    """The latent rescaling folded into the weights leaves unit-std latents (what the denoiser's
    noise assumes); the latent stage encoded other clips, so only roughly 1."""
    std = float(np.load(runs / "latents" / "train.npz")["mean"].std())
    assert 0.5 < std < 2.0


def test_decoder_fine_tune_keeps_the_encoder(runs: Path, cache: Path, tmp_path: Path) -> None:
    """--decoder-from: only decoder weights move, so latents (and a denoiser trained on them)
    stay valid; no second latent rescaling."""
    assert vae.main(["--cache", str(cache), "--out", str(tmp_path / "dec"), "--steps", "3",
                     "--batch", "2", "--frames", "5", "--size", *SIZE, "--crop", "32", "32",
                     "--eval-clips", "1", "--decoder-from", str(runs / "vae" / "vae"),
                     "--lr", "1e-3", *LOOP]) == 0
    before, after = Component(runs / "vae" / "vae"), Component(tmp_path / "dec" / "vae")
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.startswith("decoder.") for k in moved)


def test_normalise_latents_is_exact() -> None:
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLLTXVideo(**vae.vae_config(4, (8, 8), (8, 8), 1, 4)).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        before = model.encode(video).latent_dist
        decoded = model.decode(before.mean).sample
        vae.normalise_latents_(model, 2.5)
        after = model.encode(video).latent_dist
        torch.testing.assert_close(after.mean, before.mean / 2.5)
        torch.testing.assert_close(after.std, before.std / 2.5)
        torch.testing.assert_close(model.decode(after.mean).sample, decoded, atol=1e-5, rtol=0)


def test_teacher_loss_decreases_on_a_tiny_set(runs: Path, tmp_path: Path) -> None:
    """Overfit: 8 clips, 60 steps at a high learning rate; the mean loss over the last 20 steps
    is well below that of the first 20 (the zero output layer starts at E|noise - x0|^2 ~ 2)."""
    out = tmp_path / "teacher"
    assert teacher.main(["--latents", str(runs / "latents"), "--out", str(out), "--hidden", "72",
                         "--blocks", "2", "--steps", "60", "--batch", "8", "--lr", "3e-3",
                         "--warmup", "5", "--eval-every", "0", "--eval-clips", "4",
                         "--threads", "1", "--log-every", "20"]) == 0
    curve = losses(out)
    print("teacher loss curve", curve)
    assert curve[-1] < 0.8 * curve[0], curve


def test_distillation_loss_decreases(runs: Path, random_teacher: Path, tmp_path: Path) -> None:
    """The student's two regressions go down on a handful of trajectories."""
    out = tmp_path / "student"
    assert distill.main(["--teacher", str(random_teacher), "--latents", str(runs / "latents"),
                         "--out", str(out), "--trajectories", "4", "--steps", "40", "--batch",
                         "4", "--lr", "3e-3", "--warmup", "5", "--eval-every", "0",
                         "--eval-clips", "2", "--threads", "1", "--log-every", "10"]) == 0
    curve = losses(out)
    print("distillation loss curve", curve)
    assert curve[-1] < 0.8 * curve[0], curve


def test_resume_continues_the_run(runs: Path, tmp_path: Path) -> None:
    args = ["--latents", str(runs / "latents"), "--out", str(tmp_path / "t"), "--hidden", "72",
            "--blocks", "2", "--batch", "2", "--eval-every", "0", "--eval-clips", "2", *LOOP]
    assert teacher.main(args + ["--steps", "2"]) == 0
    assert teacher.main(args + ["--steps", "4", "--resume"]) == 0
    log = read_log(tmp_path / "t")
    assert [r["resumed_at_step"] for r in log if "resumed_at_step" in r] == [2]
    assert [r["step"] for r in log if "loss" in r] == [2, 4]


def test_teacher_starts_from_given_weights(runs: Path, random_teacher: Path, tmp_path: Path
                                           ) -> None:
    """--init-from: with no steps the saved teacher is exactly the weights it started from."""
    assert teacher.main(["--latents", str(runs / "latents"), "--out", str(tmp_path / "t"),
                         "--init-from", str(random_teacher / "transformer"), "--steps", "0",
                         "--eval-clips", "2", *LOOP]) == 0
    start = Component(random_teacher / "transformer")
    saved = Component(tmp_path / "t" / "transformer")
    assert start.config == saved.config and set(start) == set(saved)
    assert all(np.array_equal(np.asarray(start[k]), np.asarray(saved[k])) for k in start)


# torch.compile's own imports use a deprecated torch.jit decorator (torch 2.13)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_teacher_trains_like_the_eager_one(runs: Path, random_teacher: Path,
                                                    tmp_path: Path) -> None:
    """--compile compiles the blocks in place: the same parameters train (the losses and the
    saved EMA weights follow the eager run's) and the export sees them under the same keys."""
    args = ["--latents", str(runs / "latents"), "--init-from", str(random_teacher / "transformer"),
            "--steps", "4", "--batch", "2", "--lr", "1e-2", "--warmup", "0", "--eval-every", "0",
            "--eval-clips", "2", "--threads", "1", "--log-every", "1"]
    assert teacher.main(args + ["--out", str(tmp_path / "eager")]) == 0
    assert teacher.main(args + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    print("eager", eager, "compiled", compiled)
    assert np.allclose(compiled, eager, rtol=1e-4), (eager, compiled)
    start, a, b = (Component(path / "transformer") for path in
                   (random_teacher, tmp_path / "eager", tmp_path / "compiled"))
    assert set(a) == set(b) == set(start)
    # the distance over all weights, not the largest difference: Adam's first steps move each
    # weight by ~lr whatever its gradient, so rounding can flip one with a near-zero gradient
    def distance(x: Component, y: Component) -> float:
        return float(np.sqrt(sum(np.sum((np.asarray(x[k], np.float64) - np.asarray(y[k])) ** 2)
                                 for k in x)))

    moved, apart = distance(a, start), distance(a, b)
    print(f"training moved the weights by {moved:.3g}; eager and compiled {apart:.3g} apart")
    assert moved > 1e-2 and apart < 0.01 * moved


def test_export_animates_a_photo(runs: Path) -> None:
    pipe = Pipeline.load(runs / "model")
    assert pipe.vae.spatial_compression == 8 and pipe.vae.temporal_compression == 2
    frames = pipe(synthetic_photo(60, 90, seed=9), seed=0)
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    stored = {Component(runs / "model" / name).storage_dtypes() == {"F16"}
              for name in ("transformer", "vae")}
    assert stored == {True}


def test_export_refuses_an_existing_folder(runs: Path) -> None:
    with pytest.raises(SystemExit, match="already exists"):
        export.export(runs / "vae" / "vae", runs / "student", runs / "model",
                      {"height": 32, "width": 48, "frames": 5, "fps": 8, "motion": 2.0}, 40)


def test_export_enforces_the_size_limit(runs: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="over --max-mb"):
        export.export(runs / "vae" / "vae", runs / "student", tmp_path / "model",
                      {"height": 32, "width": 48, "frames": 5, "fps": 8, "motion": 2.0}, 0.01)
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())


def test_export_links_the_vae_of_another_model(runs: Path, tmp_path: Path) -> None:
    """--link-vae: vae/ is a relative link (the pair survives a move), not counted in the size."""
    defaults = {"height": 32, "width": 48, "frames": 5, "fps": 8, "motion": 2.0}
    student = tmp_path / "weights" / "student"
    full = export.export(runs / "vae" / "vae", runs / "student", student, defaults, 40)
    linked = export.export(None, runs / "teacher", tmp_path / "weights" / "teacher", defaults, 40,
                           link_vae=student)
    assert linked < full - export.folder_bytes(student / "vae") + 4096
    moved = tmp_path / "moved"
    (tmp_path / "weights").rename(moved)
    link = moved / "teacher" / "vae"
    assert link.is_symlink() and link.resolve() == (moved / "student" / "vae").resolve()
    frames = Pipeline.load(moved / "teacher")(synthetic_photo(60, 90, seed=9), seed=0)
    assert frames.shape == (5, 32, 48, 3)
    with pytest.raises(SystemExit, match="exactly one"):
        export.export(None, runs / "teacher", tmp_path / "x", defaults, 40)


def test_numpy_denoiser_matches_torch_on_exported_weights(runs: Path, random_teacher: Path,
                                                         tmp_path: Path) -> None:
    """The exported FP16 transformer: the numpy runtime vs our torch reference on the same
    FP16-rounded weights (the random teacher: outputs of order 1)."""
    export.export(runs / "vae" / "vae", random_teacher, tmp_path / "model",
                  {"height": 32, "width": 48, "frames": 5, "fps": 8, "motion": 2.0}, 40)
    reference, _ = teacher.load_denoiser(tmp_path / "model" / "transformer")   # FP16 -> float32
    ours = load_numpy_denoiser(tmp_path / "model")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 4, 6), dtype=np.float32)
    t, flow = np.array([900.0, 250.0], np.float32), np.array([1.0, 6.5], np.float32)
    mask = guide_mask(x.shape)
    with torch.no_grad():
        expected = reference(*map(torch.from_numpy, (x, t, mask, flow))).numpy()
    got = ours(x, t, mask, flow)
    print(f"denoiser: max |torch| {np.abs(expected).max():.3g}, "
          f"max |numpy - torch| {np.abs(got - expected).max():.3g}")
    assert np.abs(expected).max() > 0.5
    assert np.abs(got - expected).max() <= PARITY

    # the distillation's torch Euler is the runtime sampler: same 2-step result
    guide, sigmas = x[:1, :, :1], [1.0, 0.75, 0.0]
    with torch.no_grad():
        _, expected = distill.euler(reference, torch.from_numpy(x[:1]), torch.from_numpy(guide),
                                    torch.tensor([2.0]), sigmas, 0.75)
    got = sample(ours, x[:1], guide, sigmas, 2.0)
    assert np.abs(got - expected.numpy()).max() <= PARITY


def test_numpy_vae_matches_diffusers_on_exported_weights(runs: Path) -> None:
    """The exported FP16 VAE: numpy decode (and encode) vs diffusers on the same weights."""
    folder = runs / "model" / "vae"
    config, state = Component(folder).config, Component(folder)
    reference = diffusers.AutoencoderKLLTXVideo.from_config(config).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(state[k])) for k in state})
    ours = load_vae(folder)
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((1, 4, 3, 4, 6), dtype=np.float32)
    video = rng.uniform(-1, 1, (1, 3, 5, 32, 48)).astype(np.float32)
    with torch.no_grad():
        decoded = reference.decode(torch.from_numpy(latent)).sample.numpy()
        mean = reference.encode(torch.from_numpy(video)).latent_dist.mean.numpy()
    print(f"vae: max |decode| {np.abs(decoded).max():.3g}, decode diff "
          f"{np.abs(ours.decode(latent) - decoded).max():.3g}, encode diff "
          f"{np.abs(ours.encode(video)[0] - mean).max():.3g}")
    assert np.abs(decoded).max() > 0.1
    assert np.abs(ours.decode(latent) - decoded).max() <= PARITY
    assert np.abs(ours.encode(video)[0] - mean).max() <= PARITY


def _noise_clip(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)


def test_rendered_stream_is_the_same_from_a_thread_or_worker_processes():
    """Item i is drawn from its own generator [*seed, i], whatever renders it: a GPU run with
    --workers sees the clips a CPU run would."""
    from itertools import islice

    from train.common import rendered
    thread = list(islice(rendered(_noise_clip, [3, 0], workers=0, ahead=2), 5))
    processes = list(islice(rendered(_noise_clip, [3, 0], workers=2), 5))
    assert all(np.array_equal(a, b) for a, b in zip(thread, processes))
    assert not np.array_equal(thread[0], thread[1])


def test_quantised_clips_become_the_vae_layout_within_half_a_level():
    from train.common import quantise, to_video
    clip = _noise_clip(np.random.default_rng(0))                    # [T, H, W, 3]
    video = to_video(quantise(clip))                                  # [3, T, H, W]
    assert video.shape == (3, 2, 4, 4) and video.dtype == torch.float32
    assert float((video - to_video(clip)).abs().max()) <= 0.5 / 127.5 + 1e-6
