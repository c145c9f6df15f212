"""Training data (train/data.py): procedural clips, exact flow scores, manifest and split.

Synthetic photos only: nothing here downloads (fetch itself is exercised by running it)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from train.data import (
    CutOut,
    Motion,
    Photo,
    _extent,
    assign_splits,
    bilinear,
    dep5_licence,
    fit_image,
    load_photo,
    make_clip,
    mean_flow,
    pack,
    parse_dep5,
    read_manifest,
    reference_scale,
    render_clip,
    sample_motion,
    select_heldout,
    write_manifest,
)

SIZE = (48, 72)


def synthetic_photo(h: int = 240, w: int = 360, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus texture: [h, w, 3] uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([y, x, 0.5 + 0.5 * np.sin(8 * (x + y))], -1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def pan(frames: int, dy: float, dx: float) -> Motion:
    t = np.arange(frames)[:, None]
    return Motion(t * np.array([dy, dx]), np.ones(frames), np.zeros(frames))


def ramp_image(h: int, w: int) -> np.ndarray:
    """Channels = (y, x, 0): bilinear sampling of it returns the sampled coordinates exactly."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([y, x, np.zeros_like(y)], -1)


def motion_with_cutout(seed: int, frames: int = 9) -> Motion:
    rng = np.random.default_rng(seed)
    while (motion := sample_motion(rng, frames, SIZE)).cutout is None:
        pass
    return motion


# ---- make_clip --------------------------------------------------------------------------------

def test_make_clip_shape_range_and_determinism():
    photo = synthetic_photo()
    clip, score = make_clip(photo, np.random.default_rng(7), frames=9, size=SIZE)
    assert clip.shape == (9, *SIZE, 3) and clip.dtype == np.float32
    assert np.isfinite(clip).all() and clip.min() >= -1 and clip.max() <= 1
    assert isinstance(score, float) and score >= 0
    again, score_again = make_clip(photo, np.random.default_rng(7), frames=9, size=SIZE)
    np.testing.assert_array_equal(clip, again)
    assert score == score_again
    other, _ = make_clip(photo, np.random.default_rng(8), frames=9, size=SIZE)
    assert not np.array_equal(clip, other)


def test_make_clip_works_on_small_and_portrait_photos():
    for shape in ((60, 90), (400, 150)):
        clip, _ = make_clip(synthetic_photo(*shape), np.random.default_rng(1), frames=5, size=SIZE)
        assert clip.shape == (5, *SIZE, 3) and np.isfinite(clip).all()


# ---- rendering --------------------------------------------------------------------------------

def test_bilinear_is_exact_on_pixels_and_linear_between():
    image = np.random.default_rng(0).random((5, 6, 3), dtype=np.float32)
    ys, xs = np.mgrid[0:5, 0:6]
    np.testing.assert_array_equal(bilinear(image, ys.ravel(), xs.ravel()), image.reshape(-1, 3))
    got = bilinear(image, np.array([1.25]), np.array([2.5]))[0]
    top = (image[1, 2] + image[1, 3]) / 2
    bottom = (image[2, 2] + image[2, 3]) / 2
    np.testing.assert_allclose(got, 0.75 * top + 0.25 * bottom, rtol=1e-6)


def test_frame0_is_the_crop():
    image = np.random.default_rng(1).random((120, 160, 3), dtype=np.float32)
    motion = motion_with_cutout(3)
    clip = render_clip(image, (30, 40), SIZE, motion)
    np.testing.assert_array_equal(clip[0], image[30:30 + SIZE[0], 40:40 + SIZE[1]])
    assert not np.allclose(clip[-1], clip[0])


def test_an_unmoved_cutout_leaves_the_photo_untouched():
    """The hole it leaves is covered exactly while the object has not moved."""
    image = np.random.default_rng(2).random((80, 100, 3), dtype=np.float32)
    cut = motion_with_cutout(4).cutout
    still = Motion.still(5)
    motion = Motion(still.shift, still.zoom, still.angle,
                    CutOut(cut.centre, cut.radii, cut.angle, np.zeros((5, 2))))
    clip = render_clip(image, (10, 12), SIZE, motion)
    np.testing.assert_allclose(clip, np.broadcast_to(clip[0], clip.shape), atol=1e-6)


def test_pan_moves_the_content_by_the_pan():
    image = np.random.default_rng(3).random((80, 120, 3), dtype=np.float32)
    clip = render_clip(image, (5, 5), SIZE, pan(4, 0, 2))
    for t in range(3):   # content at x + 2 in frame t is at x in frame t+1: flow (0, -2)
        np.testing.assert_array_equal(clip[t + 1][:, :-2], clip[t][:, 2:])


def test_fit_image_keeps_every_sampled_point_inside():
    rng = np.random.default_rng(5)
    photo = synthetic_photo(200, 300)
    for _ in range(30):
        motion = sample_motion(rng, 9, SIZE)
        image, (oy, ox) = fit_image(photo, motion, SIZE, rng)
        low, high = _extent(motion, SIZE)
        assert oy + low[0] >= 0 and ox + low[1] >= 0
        assert oy + high[0] <= image.shape[0] - 1 and ox + high[1] <= image.shape[1] - 1
        assert image.min() >= -1 and image.max() <= 1


# ---- flow score -------------------------------------------------------------------------------

@pytest.mark.parametrize("speed", [0.4, 1.5, 3.0])
def test_flow_of_a_pure_pan_is_its_speed(speed):
    for direction in (0.0, 0.7, 2.5):
        motion = pan(9, speed * np.sin(direction), speed * np.cos(direction))
        assert mean_flow(motion, SIZE) == pytest.approx(speed, rel=0.02)


def test_no_motion_gives_zero_flow():
    assert mean_flow(Motion.still(9), SIZE) == pytest.approx(0, abs=1e-6)


def test_faster_motion_gives_a_larger_score():
    t = np.linspace(0, 1, 9)
    assert mean_flow(pan(9, 0, 1), SIZE) < mean_flow(pan(9, 0, 2), SIZE)
    zooms = [mean_flow(Motion(np.zeros((9, 2)), np.exp(r * 8 * t), np.zeros(9)), SIZE)
             for r in (0.005, 0.01, 0.02)]
    rolls = [mean_flow(Motion(np.zeros((9, 2)), np.ones(9), r * 8 * t), SIZE)
             for r in (0.002, 0.004)]
    cut = motion_with_cutout(6).cutout
    objects = [mean_flow(Motion(np.zeros((9, 2)), np.ones(9), np.zeros(9),
                                CutOut(cut.centre, cut.radii, cut.angle,
                                       v * np.arange(9)[:, None] * np.array([0.6, 0.8]))), SIZE)
               for v in (1.0, 2.0)]
    for scores in (zooms, rolls, objects):
        assert 0 < scores[0] and all(np.diff(scores) > 0)
    assert objects[0] < 1           # the cut-out covers part of the frame: below its own speed


def test_flow_agrees_with_the_rendered_pixels():
    """Independent check of `mean_flow` for camera motion: render a coordinate ramp (each pixel
    shows the image point it samples), fit each frame's affine map from the pixels, and
    measure where frame t's points land in frame t+1."""
    image = ramp_image(200, 260)
    t = np.arange(6, dtype=np.float64)
    motions = [Motion(t[:, None] * [1.3, -0.7], np.exp(0.03 * t), 0.02 * t),       # in, roll
               Motion(t[:, None] ** 1.5 * [-0.5, 2.0], np.exp(-0.04 * t), -0.01 * t),  # out
               Motion(np.zeros((6, 2)), np.ones(6), 0.03 * t ** 2)]                  # roll
    q = np.stack(np.mgrid[0:SIZE[0], 0:SIZE[1]], -1).reshape(-1, 2).astype(np.float64)
    design = np.concatenate([q, np.ones((len(q), 1))], 1)                # [HW, 3]
    for motion in motions:
        clip = render_clip(image, (70, 90), SIZE, motion)
        flows = []
        for k in range(len(clip) - 1):
            p_k = clip[k, ..., :2].reshape(-1, 2).astype(np.float64)     # image points, frame k
            fit = np.linalg.lstsq(design, clip[k + 1, ..., :2].reshape(-1, 2), rcond=None)[0]
            lin, off = fit[:2].T, fit[2]                         # frame k+1: p = lin q + off
            q_next = np.linalg.solve(lin, (p_k - off).T).T
            flows.append(np.linalg.norm(q_next - q, axis=1).mean())
        assert mean_flow(motion, SIZE) == pytest.approx(np.mean(flows), rel=1e-3)


def test_scores_are_in_reference_pixels_and_resolution_independent():
    assert reference_scale((720, 1280)) == 1
    assert reference_scale((360, 640)) == 2
    for seed in range(10):
        small = sample_motion(np.random.default_rng(seed), 9, (36, 64))
        large = sample_motion(np.random.default_rng(seed), 9, (72, 128))
        assert (mean_flow(small, (36, 64)) * reference_scale((36, 64))
                == pytest.approx(mean_flow(large, (72, 128)) * reference_scale((72, 128)),
                                 rel=0.02, abs=1e-3))


def test_sampled_scores_cover_static_to_fast():
    rng = np.random.default_rng(0)
    size = (18, 32)
    scores = np.array([mean_flow(sample_motion(rng, 9, size), size) * reference_scale(size)
                       for _ in range(300)])
    assert 0.05 < np.mean(scores < 0.3) < 0.3        # near-static clips
    assert 0.5 < np.median(scores) < 5
    assert np.percentile(scores, 95) > 5


# ---- manifest and held-out split ----------------------------------------------------------------

def photo_row(i: int, source: str, path: str | None = None) -> Photo:
    digest = f"{(i * 7919) % 1000:03d}" + "0" * 61
    return Photo(digest, f"photos/{digest[:16]}.png", source, "1.0",
                 path or f"usr/share/p{i}.jpg", "CC0-1.0", "doc", "someone", 640, 480)


def catalogue() -> list[Photo]:
    photos = [photo_row(i, f"debian:pkg{i % 3}") for i in range(20)]
    photos += [photo_row(20 + i, "pypi:scikit-image", f"skimage/data/x{i}.png") for i in range(3)]
    # the largest id of all: chosen because it is required, not by the smallest-id rule
    photos.append(Photo("f" * 64, "photos/ffff.png", "pypi:scikit-image", "0.26.0",
                        "skimage/data/chelsea.png", "CC0-1.0", "doc", "Stefan", 451, 300))
    return photos


def test_manifest_round_trip(tmp_path):
    photos = assign_splits(catalogue())
    path = tmp_path / "manifest.json"
    write_manifest(path, photos)
    assert read_manifest(path) == sorted(photos, key=lambda p: p.id)
    assert not (tmp_path / "manifest.json.tmp").exists()


def test_pack_keeps_every_pixel_and_the_manifest(tmp_path):
    from PIL import Image
    cache, out = tmp_path / "cache", tmp_path / "packed"
    (cache / "photos").mkdir(parents=True)
    photos = []
    for i, row in enumerate(catalogue()[:3]):
        Image.fromarray(synthetic_photo(40 + i, 60, seed=i)).save(cache / row.file)
        photos.append(row)
    write_manifest(cache / "manifest.json", photos)
    packed = pack(cache, out)
    assert [p.file for p in packed] == [p.file.replace(".png", ".webp") for p in
                                        read_manifest(cache / "manifest.json")]
    assert read_manifest(out / "manifest.json") == packed
    for before, after in zip(read_manifest(cache / "manifest.json"), packed):
        assert before.id == after.id and before.split == after.split
        assert np.array_equal(load_photo(cache, before), load_photo(out, after))


def test_manifest_version_is_checked(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"version": 99, "photos": []}')
    with pytest.raises(ValueError, match="version"):
        read_manifest(path)


def test_heldout_is_deterministic_and_covers_every_source():
    photos = catalogue()
    heldout = select_heldout(photos)
    shuffled = photos[:]
    random.Random(1).shuffle(shuffled)
    assert select_heldout(shuffled) == heldout
    assert len(heldout) == 6
    assert "f" * 64 in heldout                                   # chelsea.png
    by_id = {p.id: p for p in photos}
    assert {by_id[i].source for i in heldout} == {p.source for p in photos}
    splits = {p.id: p.split for p in assign_splits(photos)}
    assert sorted(i for i, s in splits.items() if s == "heldout") == heldout
    assert sum(s == "train" for s in splits.values()) == len(photos) - 6


def test_dep5_licence_of_installed_files_last_paragraph_wins():
    text = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2014 Somebody
License: GPL-2+

Files: 16.04/a_by_Someone.jpg
       16.04/b_*.jpg
Copyright: Someone,
 2018
License: CC-BY-4.0

Files: debian/*
 AUTHORS
Copyright: 2018, Packager
License: Expat

Files: nature/*.jpg
Copyright: 2008, Photographer
License: GPL-2+

License: CC-BY-4.0
 Full text.
"""
    paragraphs = parse_dep5(text)
    assert dep5_licence(paragraphs, "usr/share/backgrounds/a_by_Someone.jpg") == \
        ("CC-BY-4.0", "Someone, 2018")
    assert dep5_licence(paragraphs, "usr/share/16.04/b_x.jpg")[0] == "CC-BY-4.0"
    assert dep5_licence(paragraphs, "usr/share/backgrounds/c.jpg") == ("GPL-2+", "2014 Somebody")
    # a wildcard scoped to a directory only covers files installed under that directory
    assert dep5_licence(paragraphs, "usr/share/backgrounds/b_x.jpg")[0] == "GPL-2+"
    assert dep5_licence(paragraphs, "usr/share/bg/mate/nature/d.jpg") == \
        ("GPL-2+", "2008, Photographer")
    assert dep5_licence(paragraphs, "usr/share/doc/pkg/AUTHORS")[0] == "Expat"
