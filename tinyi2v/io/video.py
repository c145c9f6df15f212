"""Write a clip by the output's extension: .mp4 (H.264 via PyAV), .webp / .gif (Pillow), or a
folder of PNG frames (no extension). Every write is atomic: the clip goes to a temporary name
beside the target and is renamed into place only when complete, so a failed or interrupted run
never leaves a partial file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import TinyI2VError

FORMATS = ("mp4", "webp", "gif", "png")


def output_format(path: str | os.PathLike) -> str:
    """'mp4', 'webp', 'gif', or 'png' (a folder of frames) from the output path."""
    p = str(path)
    suffix = Path(p).suffix.lower().lstrip(".")
    if p.endswith(("/", os.sep)) or not suffix or Path(p).is_dir():
        return "png"
    if suffix not in FORMATS[:3]:
        raise TinyI2VError(f"{path}: unknown output format '.{suffix}'; use .mp4, .webp, .gif, "
                           "or a folder name for PNG frames")
    return suffix


def h264_available() -> bool:
    if importlib.util.find_spec("av") is None:
        return False
    import av

    return "libx264" in av.codecs_available or "h264" in av.codecs_available


def check_output(path: str | os.PathLike) -> str:
    """Validate the output before any heavy work: format, encoder, writable folder."""
    fmt = output_format(path)
    if fmt == "mp4" and not h264_available():
        raise TinyI2VError("no H.264 encoder: install PyAV (pip install 'tinyi2v[video]') for "
                           ".mp4, or write .webp, .gif or a folder of PNG frames")
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise TinyI2VError(f"{path}: folder {parent} does not exist")
    try:                                                      # a real probe: root ignores modes
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise TinyI2VError(f"{path}: cannot write in {parent} ({e.strerror or e})") from None
    if target.exists() and (fmt == "png") != target.is_dir():
        raise TinyI2VError(f"{path}: exists and is {'a file' if fmt == 'png' else 'a folder'}")
    return fmt


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write frames [T, H, W, 3] uint8 atomically; returns the path written."""
    fmt = check_output(path)
    target = Path(path)
    comment = json.dumps(dict(metadata or {}), sort_keys=True)
    try:
        if fmt == "png":
            return _atomic_dir(target, lambda tmp: _write_png_frames(tmp, frames, comment))
        return _atomic_file(target, lambda tmp: WRITERS[fmt](tmp, frames, fps, comment))
    except OSError as e:
        raise TinyI2VError(f"{path}: cannot write ({e.strerror or e})") from None


def _atomic_file(target: Path, write: Callable[[Path], None]) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                         # mkstemp makes it private
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_mp4(path: Path, frames: np.ndarray, fps: float, comment: str) -> None:
    import av
    from fractions import Fraction

    T, H, W, _ = frames.shape
    frames = frames[:, : H - H % 2, : W - W % 2]              # yuv420p needs even sizes
    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata["comment"] = comment
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"                            # what browsers play
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():                       # flush the encoder
            container.mux(packet)


def _write_pillow(path: Path, frames: np.ndarray, fps: float, **options) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0, **options)


def _write_gif(path: Path, frames: np.ndarray, fps: float, comment: str) -> None:
    _write_pillow(path, frames, fps, comment=comment.encode(), optimize=False)


def _write_webp(path: Path, frames: np.ndarray, fps: float, comment: str) -> None:
    exif = Image.Exif()
    exif[0x010E] = comment                                    # ImageDescription
    _write_pillow(path, frames, fps, quality=90, exif=exif.tobytes())


def _write_png_frames(folder: Path, frames: np.ndarray, comment: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", comment)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i:04d}.png", pnginfo=info)


WRITERS = {"mp4": _write_mp4, "gif": _write_gif, "webp": _write_webp}
