"""The shipped models (weights/tinyi2v-demo, the 2-step student, and weights/tinyi2v-teacher):
the numpy runtime against the torch references on their own FP16 weights, at the models'
default size (256x384, 17 frames -> latents [16, 5, 16, 24]): the denoiser against
train/mobilei2v_torch.py, the VAE against diffusers, and the whole sampler against the
distillation's torch Euler loop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tinyi2v.pipeline import Pipeline  # noqa: E402
from tinyi2v.rng import gaussian_noise  # noqa: E402
from tinyi2v.sampler import guide_mask, sample  # noqa: E402
from tinyi2v.weights import Component  # noqa: E402
from train import distill, teacher  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
MODELS = ["tinyi2v-demo", "tinyi2v-teacher"]
PARITY = 1e-4     # max abs difference, float32 compute on the same FP16 weights


@pytest.fixture(scope="module", params=MODELS)
def model(request) -> Path:
    path = WEIGHTS / request.param
    assert (path / "model_index.json").is_file(), f"{path} is missing: the shipped model"
    return path


def latent_input(pipe: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """A state half-way through sampling at the default size: (x [1, C, f, h, w], guide)."""
    plan = pipe.plan((pipe.defaults["height"], pipe.defaults["width"]))
    noise = gaussian_noise(0, plan.latent_shape)
    guide = 0.8 * gaussian_noise(1, plan.latent_shape)[:, :, :1]
    x = 0.5 * noise + 0.5 * gaussian_noise(2, plan.latent_shape)
    x[:, :, :1] = guide
    return x.astype(np.float32), guide.astype(np.float32)


def test_denoiser_matches_torch(model: Path) -> None:
    pipe = Pipeline.load(model)
    reference, _ = teacher.load_denoiser(model / "transformer")      # FP16 -> float32 torch
    x, guide = latent_input(pipe)
    x = np.concatenate([x, x])
    t, flow = np.array([750.0, 120.0], np.float32), np.array([2.0, 6.0], np.float32)
    mask = guide_mask(x.shape)
    with torch.no_grad():
        expected = reference(*map(torch.from_numpy, (x, t, mask, flow))).numpy()
    got = pipe.denoiser(x, t, mask, flow)
    error = np.abs(got - expected).max()
    print(f"{model.name} denoiser: max |torch| {np.abs(expected).max():.3g}, max diff {error:.3g}")
    assert np.abs(expected).max() > 0.5
    assert error <= PARITY

    # the whole schedule: the runtime sampler against the distillation's torch Euler loop
    sigmas = [float(s) for s in pipe.plan((pipe.defaults["height"], pipe.defaults["width"])).sigmas]
    noise = gaussian_noise(3, x[:1].shape)
    with torch.no_grad():
        _, expected = distill.euler(reference, torch.from_numpy(noise), torch.from_numpy(guide),
                                    torch.tensor([2.0]), sigmas, sigmas[1])
    got = sample(pipe.denoiser, noise, guide, np.array(sigmas), 2.0)
    error = np.abs(got - expected.numpy()).max()
    print(f"{model.name} sampler ({len(sigmas) - 1} steps): max diff {error:.3g}")
    assert error <= PARITY * len(sigmas)


def test_teacher_shares_the_demo_vae() -> None:
    """The teacher folder's vae/ is a link to the demo model's (4.5 MB shipped, not 24 MB)."""
    assert (WEIGHTS / "tinyi2v-teacher" / "vae").resolve() == (WEIGHTS / "tinyi2v-demo" / "vae")


def test_vae_matches_diffusers() -> None:
    pipe = Pipeline.load(WEIGHTS / "tinyi2v-demo")
    folder = WEIGHTS / "tinyi2v-demo" / "vae"
    state = Component(folder)
    reference = diffusers.AutoencoderKLLTXVideo.from_config(state.config).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(state[k])) for k in state})
    x, _ = latent_input(pipe)                                         # [1, 32, 5, 8, 12]
    frame = np.random.default_rng(0).uniform(-1, 1, (1, 3, 1, 256, 384)).astype(np.float32)
    with torch.no_grad():
        decoded = reference.decode(torch.from_numpy(x)).sample.numpy()
        mean = reference.encode(torch.from_numpy(frame)).latent_dist.mean.numpy()
    decode_error = np.abs(pipe.vae.decode(x) - decoded).max()
    encode_error = np.abs(pipe.vae.encode(frame)[0] - mean).max()
    print(f"VAE: max |decode| {np.abs(decoded).max():.3g}, decode diff "
          f"{decode_error:.3g}; max |mean| {np.abs(mean).max():.3g}, encode diff {encode_error:.3g}")
    assert np.abs(decoded).max() > 0.5
    assert decode_error <= PARITY
    assert encode_error <= PARITY
