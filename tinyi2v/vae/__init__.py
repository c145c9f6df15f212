"""Video VAEs in numpy: LTX-Video's encoder/decoder (`ltx.py`) and the Turbo-VAED decoder
(`turbo_vaed.py`), on the building blocks of `layers.py`.

    vae = load_vae("my-model")               # or its vae/ folder (a diffusers folder as is)
    mean, logvar = vae.encode(video)         # [B, 3, T, H, W] in [-1, 1] -> [B, 128, T', h, w]
    video = vae.decode(mean)                 # -> [B, 3, 8(T' - 1) + 1, 32h, 32w]
"""
from __future__ import annotations

import os

from ..errors import FormatError
from ..weights import Component, component_dir, read_json
from .ltx import CLASS_NAME as LTX_CLASS_NAME
from .ltx import LTXVideoVAE, load_ltx_vae

__all__ = ["LTXVideoVAE", "load_vae"]


def load_vae(path: str | os.PathLike, use_mmap: bool | None = None):
    """The VAE of a `vae/` component folder, or of a model folder containing `vae/`.

    The config's `_class_name` picks the implementation: AutoencoderKLLTXVideo (encoder and
    decoder) or AutoencoderKLTurboVAED (decoder only). Attributes of the result:
    `latent_channels`, `spatial_compression`, `temporal_compression`. `use_mmap` as in
    `weights.Component`; None leaves the choice to the implementation.
    """
    folder = component_dir(path, "vae")
    name = read_json(folder / "config.json").get("_class_name")
    if name == LTX_CLASS_NAME:
        return load_ltx_vae(folder, use_mmap=bool(use_mmap))
    if name == "AutoencoderKLTurboVAED":
        # imported only when such a folder is opened
        from .turbo_vaed import TurboVAEDDecoder

        return TurboVAEDDecoder(Component(folder, use_mmap=use_mmap))
    raise FormatError(f"{folder}: unsupported VAE class {name!r:.80} "
                      f"(known: {LTX_CLASS_NAME}, AutoencoderKLTurboVAED)")
