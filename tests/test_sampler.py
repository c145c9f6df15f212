"""Flow-matching schedule and Euler sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinyi2v.errors import TinyI2VError
from tinyi2v.rng import gaussian_noise
from tinyi2v.sampler import guide_mask, sample, schedule_from_config, shifted_sigmas

# Spec §7: the official 30-step, shift-3 schedule (values rounded to 5 significant digits).
OFFICIAL_30 = [1.0, 0.98827, 0.97598, 0.96308, 0.94953, 0.93528, 0.92028, 0.90445, 0.88774,
               0.87006, 0.85133, 0.83145, 0.81031, 0.78779, 0.76376, 0.73804, 0.71047, 0.68082,
               0.64886, 0.61430, 0.57682, 0.53603, 0.49146, 0.44258, 0.38871, 0.32906, 0.26265,
               0.18824, 0.10432, 0.0089290, 0.0]


def test_official_schedule_matches_spec_table():
    s = shifted_sigmas(30, shift=3.0)
    assert s.dtype == np.float32 and len(s) == 31
    np.testing.assert_allclose(s, OFFICIAL_30, atol=6e-6, rtol=0)


def test_official_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for n in (2, 30):
        sched.set_timesteps(n)
        np.testing.assert_array_equal(shifted_sigmas(n), sched.sigmas.numpy())


def test_schedule_from_config_prefers_explicit_sigmas():
    assert schedule_from_config({"sigmas": [1.0, 0.5]}).tolist() == [1.0, 0.5, 0.0]
    assert len(schedule_from_config({"num_inference_steps": 30, "shift": 3.0})) == 31
    assert len(schedule_from_config({"sigmas": [1.0, 0.5]}, num_steps=4)) == 5
    with pytest.raises(TinyI2VError, match="decrease strictly"):
        schedule_from_config({"sigmas": [0.5, 1.0, 0.0]})


def oracle(x0, noise):
    """The ideal denoiser for one known clip: the true velocity noise - x0 (on non-guide frames)."""
    return lambda x, t, mask, flow: noise - x0


@pytest.mark.parametrize("sigmas", [[1.0, 0.0], [1.0, 0.5, 0.0], list(shifted_sigmas(7))])
def test_euler_lands_on_the_data_with_the_true_velocity(sigmas):
    """Straight flow paths: Euler is exact for any schedule, one step included."""
    x0 = gaussian_noise(1, (1, 4, 3, 2, 5))
    noise = gaussian_noise(2, x0.shape)
    out = sample(oracle(x0, noise), noise, x0[:, :, :1], sigmas, flow_score=2.0)
    np.testing.assert_allclose(out, x0, atol=1e-5, rtol=0)


def test_guide_frame_is_written_before_every_call_and_kept():
    guide = np.full((1, 2, 1, 2, 3), 7.0, np.float32)
    seen = []

    def denoise(x, t, mask, flow):
        seen.append((x[:, :, 0].copy(), t.copy(), mask.copy(), flow.copy()))
        return np.ones_like(x)

    out = sample(denoise, np.zeros((1, 2, 3, 2, 3), np.float32), guide, [1.0, 0.4, 0.0], 3.5)
    assert len(seen) == 2
    for frame0, t, mask, flow in seen:
        assert np.all(frame0 == 7.0) and flow.tolist() == [3.5]
        assert mask.shape == (1, 18) and mask[0, :6].all() and not mask[0, 6:].any()
    assert [s[1][0] for s in seen] == pytest.approx([1000.0, 400.0])
    assert np.all(out[:, :, 0] == 7.0) and np.allclose(out[:, :, 1:], -1.0)


def test_guide_mask_marks_frame_zero():
    m = guide_mask((1, 8, 3, 2, 4))
    assert m.shape == (1, 24) and m.sum() == 8 and m[0, :8].all()


def test_progress_callback_reports_each_step():
    calls = []
    sample(lambda x, *a: np.zeros_like(x), np.zeros((1, 1, 2, 1, 1), np.float32),
           np.zeros((1, 1, 1, 1, 1), np.float32), shifted_sigmas(3), 1.0,
           progress=lambda *a: calls.append(a[:3]))
    assert calls == [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3)]


def test_noise_is_seeded_gaussian_and_platform_independent():
    a, b = gaussian_noise(0, (1000, 101)), gaussian_noise(0, (1000, 101))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, gaussian_noise(1, a.shape))
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    # Rebuilt in plain Python from the raw PCG64 words (a stream numpy keeps stable): Box-Muller
    # on pairs (u1, u2); cosines of all pairs first, then sines.
    words = [int(w) for w in np.random.PCG64(0).random_raw(4)]
    u = [(w >> 11) * 2.0 ** -53 for w in words]
    r = [math.sqrt(-2 * math.log(1 - u[0])), math.sqrt(-2 * math.log(1 - u[2]))]
    expect = [r[0] * math.cos(2 * math.pi * u[1]), r[1] * math.cos(2 * math.pi * u[3]),
              r[0] * math.sin(2 * math.pi * u[1]), r[1] * math.sin(2 * math.pi * u[3])]
    np.testing.assert_array_equal(gaussian_noise(0, (4,)), np.array(expect, dtype=np.float32))
