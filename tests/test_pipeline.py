"""The Python API end to end on a tiny random model (random weights: only the plumbing is tested)."""
from __future__ import annotations

import numpy as np
import pytest

from tinyi2v.errors import FormatError, TinyI2VError
from tinyi2v.pipeline import Pipeline, to_uint8

from conftest import make_tiny_model, random_denoiser_params


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(make_tiny_model(tmp_path_factory.mktemp("model")))


def photo(h=90, w=140, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_frames_shape_and_determinism(pipe):
    a = pipe(photo(), seed=1)
    assert a.shape == (9, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pipe(photo(), seed=1))            # same seed: bit-identical
    assert not np.array_equal(a, pipe(photo(), seed=2))        # other seed: other clip


def test_progress_reports_every_stage(pipe):
    seen = []
    pipe(photo(), progress=lambda stage, step, total, elapsed: seen.append((stage, step, total)))
    stages = [s for s, _, _ in seen]
    assert stages[0] == "encode" and "denoise" in stages and stages[-1] == "decode"
    assert ("denoise", 3, 3) in seen                           # the model's own 3-step schedule


def test_plan_keeps_aspect_and_rounds(pipe):
    plan = pipe.plan((90, 140))                                # default area, photo's aspect
    assert (plan.height, plan.width, plan.frames, plan.steps) == (64, 96, 9, 3)
    plan = pipe.plan((100, 100), frames=12, height=70, steps=2)
    assert (plan.height, plan.width, plan.frames, plan.steps) == (64, 64, 9, 2)
    assert any("frames rounded to 9" in n for n in plan.notes)
    assert any("size rounded" in n for n in plan.notes)
    assert plan.latent_shape == (1, 8, 2, 2, 2)
    assert any("centre-cropped" in n for n in pipe.plan((50, 300), height=64, width=64).notes)


@pytest.mark.parametrize("kwargs, match", [
    ({"frames": 0}, "frames must be at least 1"),
    ({"height": 5}, "height must be at least 32"),
    ({"steps": 0}, "steps must be at least 1"),
])
def test_bad_requests_state_the_rule(pipe, kwargs, match):
    with pytest.raises(TinyI2VError, match=match):
        pipe.plan((64, 64), **kwargs)


def test_motion_changes_the_clip(pipe):
    assert not np.array_equal(pipe(photo(), motion=1.0), pipe(photo(), motion=8.0))


def test_to_uint8_rounds_like_upstream():
    assert to_uint8(np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255, 255]


def test_transformer_and_vae_must_agree_on_latent_channels(tmp_path):
    import shutil

    from tinyi2v.denoiser import official_config
    from tinyi2v.weights import save_component

    root = make_tiny_model(tmp_path / "m")
    cfg = official_config(in_channels=4, hidden_size=72, num_blocks=1, softmax_blocks=(),
                          mlp_hidden_size=24, freq_dim=32)
    shutil.rmtree(root / "transformer")
    save_component(root / "transformer", cfg, random_denoiser_params(cfg))
    with pytest.raises(FormatError, match="takes 4 latent channels but vae/ has 8"):
        Pipeline.load(root)


def test_incomplete_model_folder_names_the_problem(tmp_path):
    root = make_tiny_model(tmp_path / "m")
    (root / "model_index.json").write_text('{"transformer": ["tinyi2v", "x"]}')
    with pytest.raises(FormatError, match="lists no 'vae' component"):
        Pipeline.load(root)
