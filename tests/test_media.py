"""Reading photos of every kind and writing clips in every format, atomically."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tinyi2v.errors import TinyI2VError
from tinyi2v.io import image as image_io
from tinyi2v.io.image import fit_image, load_image
from tinyi2v.io.video import check_output, output_format, write_video


def save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_modes_become_rgb_uint8(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))                 # fully transparent red
    assert (load_image(save(tmp_path, "a.png", rgba)) == 255).all()  # composited on white
    grey = Image.new("L", (4, 3), 100)
    assert (load_image(save(tmp_path, "g.png", grey)) == 100).all()
    pal = Image.new("RGB", (4, 3), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert load_image(save(tmp_path, "p.png", pal))[0, 0].tolist() == [10, 20, 30]
    deep = Image.fromarray(np.full((3, 4), 65535, np.uint16))          # 16-bit greyscale
    out = load_image(save(tmp_path, "d.png", deep))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and (out == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # rotate 90 degrees
    path = save(tmp_path, "r.jpg", im, exif=exif.tobytes())
    assert load_image(path).shape == (40, 20, 3)


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("this is not a picture"), "not an image file"),
    (lambda p: p.write_bytes(jpeg_bytes()[:300]), "cannot decode"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_unreadable_images_give_one_clear_error(tmp_path, make, match):
    path = tmp_path / "photo.jpg"
    make(path)
    with pytest.raises(TinyI2VError, match=match):
        load_image(path)


def test_enormous_image_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100)
    with pytest.raises(TinyI2VError, match="too large"):
        load_image(save(tmp_path, "big.png", Image.new("RGB", (20, 20))))


def jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_fit_crop_and_pad_keep_the_aspect_ratio():
    im = np.zeros((100, 200, 3), np.uint8)
    im[:, 50:150] = 255                                                 # white centre square
    crop = fit_image(im, 64, 64, "crop")
    assert crop.shape == (64, 64, 3) and crop.min() > 200               # the centre survives
    pad = fit_image(im, 64, 64, "pad")
    assert pad.shape == (64, 64, 3)
    assert pad[:8].max() == 0 and pad[-8:].max() == 0                   # black bars above/below
    with pytest.raises(TinyI2VError, match="fit must be"):
        fit_image(im, 64, 64, "stretch")


def clip(T=5, H=32, W=48):
    t = np.arange(T)[:, None, None, None]
    return ((np.indices((H, W)).sum(0)[None, ..., None] * 4 + t * 40) % 256).repeat(3, -1).astype(np.uint8)


def test_gif_and_webp_round_trip(tmp_path):
    frames = clip()
    for name in ("c.gif", "c.webp"):
        path = write_video(tmp_path / name, frames, fps=10, metadata={"seed": "3"})
        with Image.open(path) as im:
            assert im.n_frames == 5 and im.size == (48, 32)
            im.seek(1)
            im.load()
            assert im.info.get("duration") == 100
    with Image.open(tmp_path / "c.gif") as im:
        assert json.loads(im.info["comment"]) == {"seed": "3"}


def test_png_folder_round_trip(tmp_path):
    frames = clip()
    out = write_video(tmp_path / "frames", frames, fps=8, metadata={"seed": "1"})
    files = sorted(out.iterdir())
    assert len(files) == 5
    with Image.open(files[2]) as im:
        assert np.array_equal(np.asarray(im), frames[2])
        assert json.loads(im.text["Comment"]) == {"seed": "1"}


def test_mp4_plays_in_browsers(tmp_path):
    av = pytest.importorskip("av")
    frames = clip(T=9, H=64, W=96)
    path = write_video(tmp_path / "c.mp4", frames, fps=12, metadata={"seed": "7"})
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (96, 64) and stream.average_rate == 12
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert json.loads(container.metadata["comment"]) == {"seed": "7"}
    assert len(decoded) == 9
    assert np.abs(decoded[4].astype(int) - frames[4]).mean() < 8        # lossy, but close


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    from tinyi2v.io import video

    target = tmp_path / "c.gif"
    target.write_bytes(b"old clip")

    def broken(path, frames, fps, comment):
        path.write_bytes(b"half a clip")
        raise KeyboardInterrupt                                         # Ctrl-C mid-write

    monkeypatch.setitem(video.WRITERS, "gif", broken)
    with pytest.raises(KeyboardInterrupt):
        write_video(target, clip(), fps=10)
    assert target.read_bytes() == b"old clip"
    assert [p.name for p in tmp_path.iterdir()] == ["c.gif"]


def test_output_checks(tmp_path):
    assert output_format(tmp_path / "x.MP4") == "mp4" and output_format(tmp_path / "x") == "png"
    with pytest.raises(TinyI2VError, match="unknown output format"):
        output_format("clip.avi")
    with pytest.raises(TinyI2VError, match="does not exist"):
        check_output(tmp_path / "missing" / "clip.gif")
    (tmp_path / "file").write_text("")
    with pytest.raises(TinyI2VError, match="does not exist"):
        check_output(tmp_path / "file" / "clip.gif")
    with pytest.raises(TinyI2VError, match="cannot write"):
        check_output("/proc/clip.gif")


def test_missing_h264_encoder_names_the_formats_that_work(monkeypatch, tmp_path):
    from tinyi2v.io import video

    monkeypatch.setattr(video, "h264_available", lambda: False)
    with pytest.raises(TinyI2VError, match=r"\.webp, \.gif or a folder of PNG frames"):
        check_output(tmp_path / "c.mp4")
