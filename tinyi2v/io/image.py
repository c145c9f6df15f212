"""Read any photo a person has, and fit it to a size the VAE can encode.

Handles EXIF orientation, RGBA (composited on white), palette, greyscale and 16-bit images,
and turns every way an image can be unreadable into one clear `TinyI2VError`.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import TinyI2VError

MAX_PIXELS = 200_000_000   # refuse decompression bombs before decoding them


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Any image file -> [H, W, 3] uint8 RGB, upright as its EXIF orientation says."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise TinyI2VError(f"{path}: {im.width}x{im.height} pixels is too large "
                                       f"(at most {MAX_PIXELS:,} pixels)")
                im.load()                                     # decode now: truncation shows here
                return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise TinyI2VError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TinyI2VError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise TinyI2VError(f"{path}: not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TinyI2VError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise TinyI2VError(f"{path}: cannot decode the image ({e})") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> [H, W, 3] uint8."""
    if im.width == 0 or im.height == 0:
        raise TinyI2VError(f"image has no pixels ({im.width}x{im.height})")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):               # 16/32-bit greyscale
        a = np.asarray(im, dtype=np.float64)
        a = a / 65535.0 if a.max(initial=0) > 255 else a / 255.0
        grey = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        grey = np.clip(np.asarray(im) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)                  # transparent -> white, not black
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def fit_image(image: np.ndarray, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Resize [H, W, 3] uint8 to exactly (height, width) keeping the aspect ratio.

    "crop": scale to cover, then cut the centre; "pad": scale to fit inside, then pad with black.
    """
    h, w = image.shape[:2]
    im = Image.fromarray(image)
    if mode == "crop":
        scale = max(height / h, width / w)
    elif mode == "pad":
        scale = min(height / h, width / w)
    else:
        raise TinyI2VError(f"fit must be 'crop' or 'pad', got {mode!r}")
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    im = im.resize((sw, sh), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(im, ((width - sw) // 2, (height - sh) // 2))     # negative offsets crop
    return np.asarray(out, dtype=np.uint8)
