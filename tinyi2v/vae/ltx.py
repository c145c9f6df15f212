"""LTX-Video's video VAE (0.9.0, diffusers `AutoencoderKLLTXVideo`) in numpy.

A convolutional autoencoder with 32x spatial and 8x temporal compression; no attention, no
GroupNorm. Every conv is 3x3x3 with zero spatial padding and replicated edge frames in time
(encoder causal: two copies of the first frame; decoder non-causal: one of each end). Shapes for
MobileI2V's 720p case with the 0.9.0 config (../shared/docs/ltx-vae.md §2.3):

  encoder  video [3, 1, 720, 1280] -> patchify 4x4 -> [48, 1, 180, 320] -> conv_in 128
           down 0: 4 resnets, stride-2 conv -> [128, 1, 90, 160], resnet 128 -> 256
           down 1: 3 resnets, stride-2 conv -> [256, 1, 45, 80],  resnet 256 -> 512
           down 2: 3 resnets, stride-2 conv -> [512, 1, 23, 40];  down 3: 3 resnets; mid: 4 resnets
           pixel norm, SiLU, conv -> 129 = 128 means + 1 log-variance shared by all channels
  decoder  latent [128, 3, 23, 40] -> conv_in 512 -> mid: 4 resnets -> up 0: 3 resnets
           up 1: upsample (conv 512 -> 4096, depth-to-space 2x2x2, first frame dropped)
                 -> [512, 5, 46, 80], 3 resnets
           up 2: resnet 512 -> 256, upsample -> [256, 9, 92, 160], 3 resnets
           up 3: resnet 256 -> 128, upsample -> [128, 17, 184, 320], 4 resnets
           pixel norm, SiLU, conv 128 -> 48, unpatchify -> video [3, 17, 736, 1280]

A resnet is x + conv2(silu(pnorm(conv1(silu(pnorm(x)))))), the skip through LayerNorm + a 1x1 conv
when the channel count changes. Activations are channel-last [T, H, W, C] (see layers.py).

Decoding streams over rows (streaming.py): the latent enters as slabs of whole rows (all
frames), and every layer is a lazy iterator that turns row slabs into row slabs, keeping only the
two rows its 3x3 kernel still needs from the previous slab; upsamplers get slabs 8x smaller, so
every activation slab stays within ~16 MB. At 720p x 17 frames, where one up-3 activation is
490 MB, the decoder holds ~0.4 GB in all, yet every output pixel is computed once and exactly as
in the layer-by-layer decode. Frames are not finished one by one (the non-causal decoder's last
layer needs every frame of a row), so progress counts output rows.
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, TinyI2VError
from ..weights import Component, check_tensors
from ..weights import check_config as check_types
from .layers import (
    conv3d,
    depth_to_space_ltx,
    layer_norm,
    linear,
    patchify,
    pixel_norm_silu,
    unpatchify,
)
from .streaming import (
    SLAB_BYTES,
    Slabs,
    rechunk,
    stream_residual,
    stream_rows,
    write_rows,
)

CLASS_NAME = "AutoencoderKLLTXVideo"
Params = Mapping[str, np.ndarray]
Progress = Callable[[str, int, int, float], None]


def official_config() -> dict:
    """The diffusers config.json of LTX-Video 0.9.0's `vae/` (= the class defaults)."""
    return {
        "_class_name": CLASS_NAME,
        "in_channels": 3, "out_channels": 3, "latent_channels": 128,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["LTXVideoDownBlock3D"] * 4,
        "decoder_block_out_channels": [128, 256, 512, 512],
        "layers_per_block": [4, 3, 3, 3, 4], "decoder_layers_per_block": [4, 3, 3, 3, 4],
        "spatio_temporal_scaling": [True, True, True, False],
        "decoder_spatio_temporal_scaling": [True, True, True, False],
        "decoder_inject_noise": [False] * 5, "downsample_type": ["conv"] * 4,
        "upsample_residual": [False] * 4, "upsample_factor": [1] * 4,
        "timestep_conditioning": False, "patch_size": 4, "patch_size_t": 1,
        "resnet_norm_eps": 1e-6, "scaling_factor": 1.0,
        "encoder_causal": True, "decoder_causal": False,
        "spatial_compression_ratio": None, "temporal_compression_ratio": None,
    }


def check_config(cfg: Mapping, where: str) -> dict:
    """The config with diffusers' defaults filled in; FormatError for what this port lacks."""
    check_types(cfg, official_config(), where)
    cfg = {**official_config(), **cfg}

    def refuse(field: str, why: str) -> FormatError:
        return FormatError(f"{where}: {field} = {cfg[field]!r:.200} is not supported ({why})")

    if cfg["timestep_conditioning"]:
        raise refuse("timestep_conditioning", "timestep-conditioned decoding, LTX 0.9.1+")
    if any(cfg["decoder_inject_noise"]):
        raise refuse("decoder_inject_noise", "noise injection, LTX 0.9.1+")
    if any(cfg["upsample_residual"]):
        raise refuse("upsample_residual", "residual upsamplers, LTX 0.9.1+")
    if any(f != 1 for f in cfg["upsample_factor"]):
        raise refuse("upsample_factor", "only 1 is implemented")
    if any(t != "LTXVideoDownBlock3D" for t in cfg["down_block_types"]):
        raise refuse("down_block_types", "only LTXVideoDownBlock3D, the 0.9.0 block")
    if any(t != "conv" for t in cfg["downsample_type"]):
        raise refuse("downsample_type", "only strided-conv downsampling")
    if cfg["patch_size_t"] != 1:
        raise refuse("patch_size_t", "only 1 is implemented")
    for side in ("", "decoder_"):
        n = len(cfg[f"{side}block_out_channels"])
        if len(cfg[f"{side}layers_per_block"]) != n + 1:
            raise refuse(f"{side}layers_per_block", f"needs {n + 1} entries, one per block + mid")
        if len(cfg[f"{side}spatio_temporal_scaling"]) != n:
            raise refuse(f"{side}spatio_temporal_scaling", f"needs {n} entries, one per block")
    for field, ratio in (("spatial_compression_ratio", spatial_compression(cfg)),
                         ("temporal_compression_ratio", temporal_compression(cfg))):
        if cfg[field] is not None and cfg[field] != ratio:
            raise refuse(field, f"the blocks give {ratio}")
    return cfg


def spatial_compression(cfg: Mapping) -> int:
    return cfg["patch_size"] * 2 ** sum(cfg["spatio_temporal_scaling"])


def temporal_compression(cfg: Mapping) -> int:
    return cfg["patch_size_t"] * 2 ** sum(cfg["spatio_temporal_scaling"])


# ----------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Conv:
    """A 3x3x3 CausalConv3d; `activate`: pixel norm + SiLU first (the encoder/decoder heads)."""
    name: str
    c_in: int
    c_out: int
    stride: int = 1
    activate: bool = False


@dataclass(frozen=True)
class Resnet:
    prefix: str
    c_in: int
    c_out: int


@dataclass(frozen=True)
class Upsample:
    """Conv C -> 8C, then depth-to-space 2x2x2 with the first frame dropped."""
    name: str
    channels: int


Step = Conv | Resnet | Upsample
Stages = list[tuple[str, list[Step]]]     # (diffusers sub-module name, its steps), in order


def encoder_stages(cfg: Mapping) -> Stages:
    channels, n = cfg["block_out_channels"], len(cfg["block_out_channels"])
    c = channels[0]
    patched = cfg["in_channels"] * cfg["patch_size"] ** 2
    stages: Stages = [("conv_in", [Conv("encoder.conv_in.conv", patched, c)])]
    for i in range(n):
        b = f"encoder.down_blocks.{i}."
        c_out = channels[i + 1] if i + 1 < n else channels[i]
        steps: list[Step] = [Resnet(f"{b}resnets.{j}", c, c)
                             for j in range(cfg["layers_per_block"][i])]
        if cfg["spatio_temporal_scaling"][i]:
            steps.append(Conv(f"{b}downsamplers.0.conv", c, c, stride=2))
        if c_out != c:
            steps.append(Resnet(f"{b}conv_out", c, c_out))
        stages.append((f"down_blocks_{i}", steps))
        c = c_out
    stages.append(("mid_block", [Resnet(f"encoder.mid_block.resnets.{j}", c, c)
                                 for j in range(cfg["layers_per_block"][-1])]))
    stages.append(("conv_out", [Conv("encoder.conv_out.conv", c, cfg["latent_channels"] + 1,
                                     activate=True)]))
    return stages


def decoder_stages(cfg: Mapping) -> Stages:
    """Diffusers lists the decoder's per-block fields from the top (full resolution) block down;
    the decoder runs them in reverse."""
    channels = cfg["decoder_block_out_channels"][::-1]
    layers = cfg["decoder_layers_per_block"][::-1]
    scaling = cfg["decoder_spatio_temporal_scaling"][::-1]
    c = channels[0]
    stages: Stages = [("conv_in", [Conv("decoder.conv_in.conv", cfg["latent_channels"], c)]),
                      ("mid_block", [Resnet(f"decoder.mid_block.resnets.{j}", c, c)
                                     for j in range(layers[0])])]
    for i, c_out in enumerate(channels):
        b = f"decoder.up_blocks.{i}."
        steps: list[Step] = [Resnet(f"{b}conv_in", c, c_out)] if c_out != c else []
        if scaling[i]:
            steps.append(Upsample(f"{b}upsamplers.0.conv.conv", c_out))
        steps += [Resnet(f"{b}resnets.{j}", c_out, c_out) for j in range(layers[i + 1])]
        stages.append((f"up_blocks_{i}", steps))
        c = c_out
    stages.append(("conv_out", [Conv("decoder.conv_out.conv", c,
                                     cfg["out_channels"] * cfg["patch_size"] ** 2,
                                     activate=True)]))
    return stages


def step_shapes(step: Step) -> dict[str, tuple[int, ...]]:
    def conv(name: str, c_in: int, c_out: int, k: int = 3) -> dict:
        return {f"{name}.weight": (c_out, c_in, k, k, k), f"{name}.bias": (c_out,)}

    if isinstance(step, Conv):
        return conv(step.name, step.c_in, step.c_out)
    if isinstance(step, Upsample):
        return conv(step.name, step.channels, 8 * step.channels)
    shapes = conv(f"{step.prefix}.conv1.conv", step.c_in, step.c_out) \
        | conv(f"{step.prefix}.conv2.conv", step.c_out, step.c_out)
    if step.c_in != step.c_out:
        shapes |= conv(f"{step.prefix}.conv_shortcut.conv", step.c_in, step.c_out, k=1)
        shapes |= {f"{step.prefix}.norm3.weight": (step.c_in,),
                   f"{step.prefix}.norm3.bias": (step.c_in,)}
    return shapes


def param_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor encode/decode read, under the diffusers names."""
    shapes: dict[str, tuple[int, ...]] = {}
    for _, steps in encoder_stages(cfg) + decoder_stages(cfg):
        for step in steps:
            shapes |= step_shapes(step)
    return shapes


# ----------------------------------------------------------------------------- layers

def stored(p: Params, name: str) -> np.ndarray:
    """A tensor as the file stores it: FP16 stays FP16, so a weight can be sliced before it is
    cast, and the cast happens in conv_taps' reordering pass (one pass instead of two)."""
    return p.file[name] if isinstance(p, Component) else p[name]


def temporal_pad(causal: bool) -> tuple[int, int]:
    """Replicated frames before / after for a 3-tap temporal kernel."""
    return (2, 0) if causal else (1, 1)


def conv(p: Params, name: str, x: np.ndarray, causal: bool, stride: int = 1,
         pad_rows: bool = True) -> np.ndarray:
    """The CausalConv3d `name` on [T, H, W, C]; `pad_rows` as in layers.conv3d."""
    return conv3d(x, stored(p, f"{name}.weight"), p[f"{name}.bias"], (stride,) * 3,
                  temporal_pad(causal), pad_rows)


def upsample(p: Params, name: str, x: np.ndarray, causal: bool,
             pad_rows: bool = True) -> np.ndarray:
    """LTXVideoUpsampler3d: conv C -> 8C, depth-to-space.   [T, H, W, C] -> [2T-1, 2H, 2W, C]

    Output channel c comes from conv channels 8c .. 8c+7, so the conv runs in 8 groups of output
    channels: neither the 8C activation nor the whole float32 weight (up to 226 MB) ever exists."""
    weight, bias = stored(p, f"{name}.weight"), p[f"{name}.bias"]
    C = weight.shape[0] // 8
    group = max(1, C // 8)
    out = None
    for c in range(0, C, group):
        rows = slice(8 * c, 8 * (c + group))                    # contiguous rows of the weight
        part = depth_to_space_ltx(conv3d(x, weight[rows], bias[rows],
                                         temporal_pad=temporal_pad(causal), pad_rows=pad_rows))
        if out is None:
            out = np.empty(part.shape[:3] + (C,), np.float32)
        out[..., c:c + group] = part
    return out


def shortcut(p: Params, step: Resnet, x: np.ndarray, eps: float) -> np.ndarray:
    """The resnet skip: identity, or LayerNorm + 1x1x1 conv when the channel count changes."""
    if step.c_in == step.c_out:
        return x
    b = step.prefix
    x = layer_norm(x, p[f"{b}.norm3.weight"], p[f"{b}.norm3.bias"], eps)
    return linear(x, p[f"{b}.conv_shortcut.conv.weight"], p[f"{b}.conv_shortcut.conv.bias"])


def resnet(p: Params, step: Resnet, x: np.ndarray, causal: bool, eps: float) -> np.ndarray:
    h = conv(p, f"{step.prefix}.conv1.conv", pixel_norm_silu(x), causal)
    h = conv(p, f"{step.prefix}.conv2.conv", pixel_norm_silu(h), causal)
    h += shortcut(p, step, x, eps)
    return h


def run_stages(p: Params, stages: Stages, x: np.ndarray, causal: bool, eps: float,
               record: dict | None = None, prefix: str = "") -> np.ndarray:
    """Layer by layer over whole tensors; `record` collects each stage's output by name."""
    for name, steps in stages:
        for step in steps:
            if isinstance(step, Resnet):
                x = resnet(p, step, x, causal, eps)
            elif isinstance(step, Upsample):
                x = upsample(p, step.name, x, causal)
            else:
                x = conv(p, step.name, pixel_norm_silu(x) if step.activate else x, causal,
                         step.stride)
        if record is not None:
            record[prefix + name] = x
    return x


# ----------------------------------------------------------------------------- row streaming

def stream_resnet(p: Params, step: Resnet, slabs: Slabs, height: int, causal: bool,
                  eps: float) -> Slabs:
    def branch(x: Slabs) -> Slabs:
        for name in (f"{step.prefix}.conv1.conv", f"{step.prefix}.conv2.conv"):
            x = stream_rows(functools.partial(conv, p, name, causal=causal), x, height,
                            pre=pixel_norm_silu)
        return x

    return stream_residual(slabs, branch, functools.partial(shortcut, p, step, eps=eps))


def stream_stages(p: Params, stages: Stages, slabs: Slabs, height: int, causal: bool,
                  eps: float, slab_bytes: int) -> Slabs:
    """`run_stages` as a chain of lazy row-slab iterators (nothing runs until the result is read).
    Upsamplers get slabs of slab_bytes / 8, so their outputs stay within slab_bytes too."""
    for _, steps in stages:
        for step in steps:
            if isinstance(step, Resnet):
                slabs = stream_resnet(p, step, slabs, height, causal, eps)
            elif isinstance(step, Upsample):
                layer = functools.partial(upsample, p, step.name, causal=causal)
                slabs = stream_rows(layer, rechunk(slabs, slab_bytes // 8), height)
                height *= 2
            else:
                layer = functools.partial(conv, p, step.name, causal=causal)
                slabs = stream_rows(layer, slabs, height,
                                    pre=pixel_norm_silu if step.activate else None)
    return slabs


# ----------------------------------------------------------------------------- the model

class LTXVideoVAE:
    """encode(video) -> (mean, logvar), decode(latent) -> video; numpy, official layouts."""

    def __init__(self, params: Params, config: Mapping):
        self.params, self.config = params, config
        self.latent_channels = config["latent_channels"]
        self.spatial_compression = spatial_compression(config)
        self.temporal_compression = temporal_compression(config)
        self.encoder, self.decoder = encoder_stages(config), decoder_stages(config)

    def encode(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """video [B, 3, T, H, W] in [-1, 1] (H, W multiples of the patch size) -> posterior mean
        and log-variance, each [B, latent_channels, (T - 1) // 8 + 1, ceil(H / 32), ceil(W / 32)].

        Causal: latent frame k depends on frames 0 .. 8k only, and a one-frame video runs as a 2D
        network (every 3x3x3 kernel summed over time, see layers.conv3d)."""
        video = np.asarray(video, np.float32)
        cfg, L, patch = self.config, self.latent_channels, self.config["patch_size"]
        if (video.ndim != 5 or video.shape[1] != cfg["in_channels"] or 0 in video.shape
                or video.shape[3] % patch or video.shape[4] % patch):
            raise TinyI2VError(f"video must be [B, {cfg['in_channels']}, T, H, W] with H and W "
                               f"positive multiples of {patch}, got {list(video.shape)}")
        means, logvars = [], []
        for sample in video:
            out = self.encode_sample(np.ascontiguousarray(sample.transpose(1, 2, 3, 0)))
            means.append(out[..., :L].transpose(3, 0, 1, 2))
            logvar = np.clip(out[..., L:], -30.0, 20.0)          # one channel shared by all
            logvars.append(np.broadcast_to(logvar, out.shape[:3] + (L,)).transpose(3, 0, 1, 2))
        return np.stack(means), np.stack(logvars)

    def encode_sample(self, video: np.ndarray, record: dict | None = None) -> np.ndarray:
        """[T, H, W, 3] -> raw head output [T', h, w, latent_channels + 1]."""
        x = patchify(video, self.config["patch_size"])
        return run_stages(self.params, self.encoder, x, self.config["encoder_causal"],
                          self.config["resnet_norm_eps"], record, "encoder_")

    def decode(self, latent: np.ndarray, progress: Progress | None = None,
               streaming: bool = True, slab_bytes: int = SLAB_BYTES) -> np.ndarray:
        """latent [B, C, T, h, w] -> video [B, 3, 8(T - 1) + 1, 32h, 32w] (no clamp).

        `streaming` (default) runs the decoder over row slabs of about `slab_bytes` each (see
        the module docstring); False runs it layer by layer over whole tensors (the reference;
        memory grows with the clip). progress("decode", rows done, rows in all, seconds) after
        each slab of output rows, counted over the whole batch."""
        latent = np.asarray(latent, np.float32)
        cfg = self.config
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels or 0 in latent.shape:
            raise TinyI2VError(f"latent must be [B, {self.latent_channels}, T, h, w] with no "
                               f"empty axis, got {list(latent.shape)}")
        B, _, T, h, w = latent.shape
        doublings = sum(cfg["decoder_spatio_temporal_scaling"])
        up = cfg["patch_size"] * 2 ** doublings
        video = np.empty((B, cfg["out_channels"], (T - 1) * 2 ** doublings + 1, h * up, w * up),
                         np.float32)
        causal, eps = cfg["decoder_causal"], cfg["resnet_norm_eps"]
        report, H, start = progress or (lambda *a: None), video.shape[3], time.perf_counter()
        for b in range(B):
            x = np.ascontiguousarray(latent[b].transpose(1, 2, 3, 0))   # [T, h, w, C]
            if streaming:
                slabs = stream_stages(self.params, self.decoder, rechunk([x], slab_bytes), h,
                                      causal, eps, slab_bytes)
            else:
                slabs = iter([run_stages(self.params, self.decoder, x, causal, eps)])
            # [frames, rows, w', 48] -> [frames, 4 rows, W, 3]
            slabs = map(functools.partial(unpatchify, p=cfg["patch_size"]), slabs)
            for rows in write_rows(slabs, video[b]):
                report("decode", b * H + rows, B * H, time.perf_counter() - start)
        return video


def load_ltx_vae(path: str | os.PathLike, use_mmap: bool = False) -> LTXVideoVAE:
    """Open a diffusers `vae/` folder of AutoencoderKLLTXVideo (F32/F16/BF16 safetensors).

    By default the weights are not memory-mapped but read from the file whenever a layer runs:
    the streamed decoder goes through every layer once per slab, and reading from the OS page
    cache costs ~1% of the time while the process holds only the layer in use (a mapped FP16
    decoder would stay resident: +478 MB).
    """
    comp = Component(path, use_mmap=use_mmap)
    cfg = check_config(comp.config, str(comp.path))
    shapes = comp.shapes()
    extra = {k: shapes[k] for k in ("latents_mean", "latents_std") if k in shapes}
    check_tensors(shapes, param_shapes(cfg) | extra, str(comp.path))
    return LTXVideoVAE(comp, cfg)
