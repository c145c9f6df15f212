"""train/quality.py's metrics on clips whose true motion is known, and the script end to end."""
from __future__ import annotations

import numpy as np
import pytest

from train.data import Motion, bilinear, reference_scale, render_clip
from train.quality import (
    clip_metrics,
    fit_similarity,
    flow_between,
    grey,
    psnr,
    similarity_map,
    spearman,
    warp,
)


def textured(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random uint8 image [H, W, 3]: structure at several scales, like a photo."""
    rng = np.random.default_rng(seed)
    H, W = size
    out = np.zeros((H, W, 3))
    for cells in (4, 8, 16, 32):
        coarse = rng.normal(0, 1, (cells + 1, cells + 1, 3))
        y = np.linspace(0, cells, H)
        x = np.linspace(0, cells, W)
        yy, xx = np.meshgrid(y, x, indexing="ij")
        out += bilinear(coarse, yy.ravel(), xx.ravel()).reshape(H, W, 3) * 4 / cells
    out = (out - out.min()) / np.ptp(out) * 255
    return out.astype(np.uint8)


def test_fit_similarity_recovers_a_known_transform():
    image = textured((128, 192))
    true = np.array([1.03 * np.cos(0.04), 1.03 * np.sin(0.04), 4.5, -7.25])
    target, _ = warp(image, true)
    found = fit_similarity(grey(image), grey(np.clip(target, 0, 255)))
    assert np.allclose(found[:2], true[:2], atol=2e-3), found
    assert np.allclose(found[2:], true[2:], atol=0.1), found


def test_flow_between_a_pure_translation_is_its_length():
    size = (64, 96)
    a = np.array([1.0, 0, 0, 0])
    b = np.array([1.0, 0, 3.0, 4.0])
    assert flow_between(a, b, size) == pytest.approx(5.0)
    # a zoom by s about the centre moves pixel g by (1/s - 1) g: mean of |g| times that
    s = 1.1
    qy, qx = similarity_map(np.array([1.0, 0, 0, 0]), size)
    radius = np.hypot(qy - 31.5, qx - 47.5).mean()
    assert flow_between(a, np.array([s, 0, 0, 0]), size) == pytest.approx(radius * (1 - 1 / s))


def test_clip_metrics_on_a_rendered_pan():
    """A clip panned by a known speed: warp PSNR high, measured motion = the true flow score;
    the same clip with noise added to frames 1+ scores a much lower PSNR."""
    size, T, speed = (128, 192), 9, 1.5                       # clip pixels per frame
    photo = textured((220, 300), seed=1).astype(np.float32) / 127.5 - 1
    shift = np.arange(T)[:, None] * np.array([0.6, 0.8]) * speed
    clip = render_clip(photo, (40, 50), size, Motion(shift, np.ones(T), np.zeros(T)))
    frames = np.floor(np.clip(clip, -1, 1) * 127.5 + 128).astype(np.uint8)
    m = clip_metrics(frames[0], frames)
    assert m["first_psnr"] > 60
    assert m["warp_psnr"] > 35 and m["warp_psnr_photo"] == m["warp_psnr"], m
    assert m["measured_motion"] == pytest.approx(speed * reference_scale(size), rel=0.03)
    noisy = frames.copy()
    noisy[1:] = np.clip(noisy[1:] + np.random.default_rng(0).normal(0, 20, noisy[1:].shape),
                        0, 255).astype(np.uint8)
    worse = clip_metrics(frames[0], noisy)
    assert worse["warp_psnr"] < m["warp_psnr"] - 10
    # frame 0 is the guide: a blurred photo lowers the "vs photo" score only
    blurred = (frames[0].astype(np.float32) + np.roll(frames[0], 3, 1)) / 2
    soft = clip_metrics(blurred.astype(np.uint8), frames)
    assert soft["warp_psnr"] == m["warp_psnr"] and soft["warp_psnr_photo"] < m["warp_psnr"] - 10


def test_psnr_and_spearman():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a + 255) == pytest.approx(0.0)
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255))
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1.5, 1.5, 3.5, 3.5],
                                                                             [1, 2, 3, 4])[0, 1])


def test_quality_script_end_to_end(tmp_path):
    """`python -m train.quality` on two tiny random models (never a trained model) and a photo
    cache of synthetic photos: writes the report and a contact sheet of the right size."""
    from PIL import Image

    from tests.conftest import make_tiny_model
    from train.data import Photo, write_manifest
    from train.quality import main

    cache = tmp_path / "cache"
    (cache / "photos").mkdir(parents=True)
    rows = []
    for i in range(3):
        file = f"photos/{i}.png"
        Image.fromarray(textured((120, 180), seed=i)).save(cache / file)
        rows.append(Photo(f"{i:064x}", file, "synthetic", "0", file, "CC0-1.0", "test", "test",
                          180, 120, "train" if i == 0 else "heldout"))
    write_manifest(cache / "manifest.json", rows)
    teacher = make_tiny_model(tmp_path / "teacher")
    student = make_tiny_model(tmp_path / "student", seed=1, scheduler={
        "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
        "num_train_timesteps": 1000, "sigmas": [1.0, 0.75, 0.0]})
    out = tmp_path / "docs"
    assert main(["--cache", str(cache), "--student", str(student), "--teacher", str(teacher),
                 "--out", str(out), "--photos", "1", "--vae-clips", "1"]) == 0
    text = (out / "quality.md").read_text()
    rows = {line.split(" (")[0]: line.split(" | ") for line in text.splitlines()
            if line.startswith(("| teacher (", "| student ("))}
    assert rows["| teacher"][1] == "3" and rows["| student"][1] == "2"   # the steps column
    sheet = Image.open(out / "quality-contact-sheet.png")
    assert sheet.size == (5 * 48, 2 * (32 + 18))                       # 2 rows, half of 96x64
