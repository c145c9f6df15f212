"""Turbo-VAED-LTX: a mobile decoder for LTX-Video latents (hustvl/Turbo-VAED @ 9268488).

Turbo-VAED is a decoder only, distilled from the LTX-Video VAE's decoder: it reads the latents of
the LTX encoder as they are (128 channels, 32x smaller in space, 8x in time) and is ~5x cheaper.
Architecture (official `Turbo-VAED-LTX.json`), one sample, channels first, for MobileI2V's
720p latent (C, T, H, W) = (128, 3, 23, 40):

    conv_in        3x3x3 conv 128 -> 512                                   [512,  3,  23,   40]
    mid_block      1 resnet, depthwise-separable convs (5x5x5 dw + 1x1x1)  [512,  3,  23,   40]
    up_blocks.0    1 depthwise-separable resnet, no upsampling             [512,  3,  23,   40]
    up_blocks.1    resnet 512 -> 256 (LayerNorm + 1x1x1 shortcut)          [256,  3,  23,   40]
                   upsampler: conv 256 -> 8*256, 3D shuffle, drop frame 0  [256,  5,  46,   80]
                   3 resnets, ReLU before conv1                            [256,  5,  46,   80]
    up_blocks.2    resnet 256 -> 128, upsampler, 2 resnets                 [128,  9,  92,  160]
    up_blocks.3    resnet 128 -> 64, upsampler, 3 resnets                  [ 64, 17, 184,  320]
    upsampler2d_1  pixel norm, SiLU, per-frame 3x3 conv 64, shuffle x2     [ 16, 17, 368,  640]
    upsampler2d_2  pixel norm, SiLU, per-frame 3x3 conv 16, shuffle x2     [  4, 17, 736, 1280]
    conv_out       pixel norm, SiLU, 3x3x3 conv 4 -> 3                     [  3, 17, 736, 1280]

A resnet is x + conv2(SiLU(norm(conv1(act(norm(x)))))) with norm = pixel norm (RMS over channels,
no weights, eps 1e-8) and act = ReLU in the resnets that follow an upsampler, SiLU elsewhere; a
channel-changing resnet adds LayerNorm + 1x1x1 conv on the shortcut instead. Every temporal conv
pads by repeating the first and last frame (the decoder is not causal), spatial padding is zeros.
The 3D pixel shuffle splits the 8C conv channels as c*8 + dy*4 + dx*2 + dt (LTX's own decoder uses
c*8 + dt*4 + dy*2 + dx). Background and sources: ../shared/docs/ltx-vae.md §3.

Memory: the decoder streams over rows, as the LTX decoder does (streaming.py): the latent enters
as slabs of whole rows (all frames), and every layer is a lazy iterator that turns row slabs into
row slabs, keeping only the rows its kernel still needs from the previous slab (2 for a 3x3 conv,
4 for a 5x5x5 depthwise one). Slabs stay within ~16 MB (upsamplers get 8x smaller ones), so no
full-resolution activation of the clip ever exists (one is 256 MB at 720p x 17 frames), yet every
output pixel is computed once, as in a layer-by-layer decode. Activations are channel-last
[T, H, W, C] float32; weights keep their upstream names (`conv_in.conv.weight`, ...) and are read
from the component (FP16 upcast on access) when a slab needs them. Frames are not finished one
by one (the last conv needs every frame of a row), so progress counts output rows.
"""
from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, TinyI2VError
from ..sampler import Progress
from ..weights import Component, check_config, check_tensors
from .layers import (
    conv2d,
    conv3d,
    depthwise_conv3d,
    layer_norm,
    linear,
    pixel_norm,
    pixel_norm_silu,
    relu,
)
from .streaming import (
    SLAB_BYTES,
    Slabs,
    rechunk,
    stream_residual,
    stream_rows,
    write_rows,
)

Params = Mapping[str, np.ndarray]

CLASS_NAME = "AutoencoderKLTurboVAED"
DISTILLATION_ONLY = "aligned_feature_projection_heads."   # training heads, never used to decode

# Config keys of the upstream class that select features this port does not implement, with the
# value that turns each off (all official Turbo-VAED-LTX values).
UNSUPPORTED_FEATURES = {
    "decoder_causal": False, "timestep_conditioning": False, "is_video_dc_ae": False,
    "decoder_inject_noise": [False], "upsample_residual": [False], "decoder_spatio_only": [False],
    "upsample_factor": [1], "patch_size_t": 1,
}


# ----------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Block:
    """One decoder block (the mid block or an up block), in decoding order."""
    in_channels: int
    out_channels: int
    num_layers: int        # resnets after the (optional) channel change and upsampler
    upsample: bool         # 3D pixel shuffle x2 in T, H and W
    depthwise: bool        # depthwise-separable convs in its resnets


@dataclass(frozen=True)
class Architecture:
    """What a config.json describes, in decoding order."""
    latent_channels: int
    out_channels: int
    blocks: tuple[Block, ...]      # mid block, then up blocks 0..n-1
    num_2d_stages: int             # 2D pixel-shuffle stages after the last up block (0..2)
    dw_kernel_size: int
    norm_eps: float                # of the shortcut LayerNorms


def architecture(cfg: Mapping) -> Architecture:
    """Read a config.json in the upstream layout. Its lists are in *encoder* order and reversed
    here, as upstream does: after reversal entry 0 is the mid block (layers, depthwise)."""
    for key, off in UNSUPPORTED_FEATURES.items():
        value = cfg.get(key, off)
        if (any(v != off[0] for v in value) if isinstance(off, list) else value != off):
            raise FormatError(f"Turbo-VAED config: {key}={value!r:.200} is not supported "
                              f"(only the Turbo-VAED-LTX form, {key}={off!r})")
    channels = list(reversed(cfg["decoder_block_out_channels"]))
    layers = list(reversed(cfg["decoder_layers_per_block"]))
    # Upstream's decoder reads `decoder_spatio_temporal_scaling` (default T, T, T, F) and ignores
    # `spatio_temporal_scaling`, which only sets the advertised compression ratio.
    scaling = list(reversed(cfg.get("decoder_spatio_temporal_scaling", [True, True, True, False])))
    depthwise = list(reversed(cfg.get("decoder_is_dw_conv", [False] * len(layers))))
    if not (len(layers) == len(depthwise) == len(channels) + 1 == len(scaling) + 1):
        raise FormatError("Turbo-VAED config: decoder_layers_per_block and decoder_is_dw_conv need "
                          "one entry more than decoder_block_out_channels and "
                          f"decoder_spatio_temporal_scaling, got {len(layers)}, {len(depthwise)}, "
                          f"{len(channels)}, {len(scaling)}")
    patch_size = cfg.get("patch_size", 4)
    if patch_size not in (1, 2, 4):
        raise FormatError(f"Turbo-VAED config: patch_size {patch_size} is not 1, 2 or 4")
    blocks = [Block(channels[0], channels[0], layers[0], False, depthwise[0])]
    for i, out in enumerate(channels):
        blocks.append(Block(blocks[-1].out_channels, out, layers[i + 1], scaling[i],
                            depthwise[i + 1]))
    return Architecture(latent_channels=cfg.get("latent_channels", 128),
                        out_channels=cfg.get("out_channels", 3), blocks=tuple(blocks),
                        num_2d_stages={1: 0, 2: 1, 4: 2}[patch_size],
                        dw_kernel_size=cfg.get("decoder_dw_kernel_size", 3),
                        norm_eps=cfg.get("resnet_norm_eps", 1e-6))


def official_config() -> dict:
    """hustvl/Turbo-VAED's configs/Turbo-VAED-LTX.json, less the distillation-only heads."""
    return {
        "_class_name": CLASS_NAME,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 128,
        "decoder_block_out_channels": [64, 128, 256, 512],
        "decoder_layers_per_block": [3, 2, 3, 1, 1],
        "spatio_temporal_scaling": [True, True, True, False],
        "decoder_is_dw_conv": [False, False, False, True, True],
        "decoder_dw_kernel_size": 5,
        "patch_size": 4,
        "patch_size_t": 1,
        "resnet_norm_eps": 1e-6,
        "scaling_factor": 1.0,
        "decoder_causal": False,
    }


def config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """The config of a decoder state dict (decoder-level names): channels, layers, upsamplers,
    depthwise blocks and patch size are read from the shapes, the rest is the official config."""
    missing = [k for k in ("conv_in.conv.weight", "conv_out.conv.weight") if k not in shapes]
    if missing:
        raise FormatError(f"not a Turbo-VAED decoder state dict: missing {', '.join(missing)}")

    def indices(prefix: str) -> list[int]:
        return sorted({int(m.group(1)) for k in shapes
                       if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})

    def conv_out_channels(prefix: str) -> int | None:
        for name in (f"{prefix}.conv.weight", f"{prefix}.pointwise_conv.weight"):
            if name in shapes:
                return shapes[name][0]
        return None

    def depthwise_kernels(prefix: str) -> list[int]:
        return [s[-1] for k, s in shapes.items()
                if k.startswith(prefix) and k.endswith("depthwise_conv.weight") and s[-1] > 1]

    channels = [shapes["conv_in.conv.weight"][0]]             # decoding order, mid block first
    layers = [len(indices("mid_block.resnets"))]
    depthwise = [bool(depthwise_kernels("mid_block."))]
    scaling = []
    for i in indices("up_blocks"):
        b = f"up_blocks.{i}"
        # only a block that changes the channel count has a conv_in resnet
        channels.append(conv_out_channels(f"{b}.conv_in.conv1") or channels[-1])
        layers.append(len(indices(f"{b}.resnets")))
        depthwise.append(bool(depthwise_kernels(f"{b}.")))
        scaling.append(f"{b}.upsamplers.0.conv.conv.weight" in shapes)
    kernels = depthwise_kernels("") or [official_config()["decoder_dw_kernel_size"]]
    patch_size = 4 if "upsampler2d_2.conv.weight" in shapes else (
        2 if "upsampler2d_1.conv.weight" in shapes else 1)
    encoder_order = list(reversed(scaling))
    return official_config() | {
        "latent_channels": shapes["conv_in.conv.weight"][1],
        "out_channels": shapes["conv_out.conv.weight"][0],
        "decoder_block_out_channels": list(reversed(channels[1:])),
        "decoder_layers_per_block": list(reversed(layers)),
        "spatio_temporal_scaling": encoder_order,
        "decoder_spatio_temporal_scaling": encoder_order,
        "decoder_is_dw_conv": list(reversed(depthwise)),
        "decoder_dw_kernel_size": kernels[0],
        "patch_size": patch_size,
    }


def conv_shapes(prefix: str, c_in: int, c_out: int, kernel: int, depthwise: bool) -> dict:
    """A 3D conv module: `prefix.conv.*` or `prefix.{depthwise,pointwise}_conv.*`."""
    if not depthwise:
        return {f"{prefix}.conv.weight": (c_out, c_in, kernel, kernel, kernel),
                f"{prefix}.conv.bias": (c_out,)}
    return {f"{prefix}.depthwise_conv.weight": (c_in, 1, kernel, kernel, kernel),
            f"{prefix}.depthwise_conv.bias": (c_in,),
            f"{prefix}.pointwise_conv.weight": (c_out, c_in, 1, 1, 1),
            f"{prefix}.pointwise_conv.bias": (c_out,)}


def resnet_shapes(prefix: str, c_in: int, c_out: int, depthwise: bool, dw_kernel: int) -> dict:
    kernel = dw_kernel if depthwise else 3
    shapes = (conv_shapes(f"{prefix}.conv1", c_in, c_out, kernel, depthwise)
              | conv_shapes(f"{prefix}.conv2", c_out, c_out, kernel, depthwise))
    if c_in != c_out:
        shapes |= {f"{prefix}.norm3.weight": (c_in,), f"{prefix}.norm3.bias": (c_in,)}
        shapes |= conv_shapes(f"{prefix}.conv_shortcut", c_in, c_out, 1, depthwise)
    return shapes


def param_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder reads, with its shape, under the upstream decoder-level names."""
    arch = architecture(cfg)
    mid, *ups = arch.blocks
    shapes = conv_shapes("conv_in", arch.latent_channels, mid.in_channels, 3, False)
    for j in range(mid.num_layers):
        shapes |= resnet_shapes(f"mid_block.resnets.{j}", mid.in_channels, mid.out_channels,
                                mid.depthwise, arch.dw_kernel_size)
    for i, block in enumerate(ups):
        b, c = f"up_blocks.{i}", block.out_channels
        if block.in_channels != c:
            shapes |= resnet_shapes(f"{b}.conv_in", block.in_channels, c, block.depthwise,
                                    arch.dw_kernel_size)
        if block.upsample:
            shapes |= conv_shapes(f"{b}.upsamplers.0.conv", c, 8 * c, 3, False)
        for j in range(block.num_layers):
            shapes |= resnet_shapes(f"{b}.resnets.{j}", c, c, block.depthwise, arch.dw_kernel_size)
    c = arch.blocks[-1].out_channels
    for stage in range(1, arch.num_2d_stages + 1):
        shapes |= {f"upsampler2d_{stage}.conv.weight": (c, c, 3, 3),
                   f"upsampler2d_{stage}.conv.bias": (c,)}
        c //= 4
    return shapes | conv_shapes("conv_out", c, arch.out_channels, 3, False)


# ----------------------------------------------------------------------------- layers
# Each runs on a whole activation [T, H, W, C] or, with pad_rows=False, on a slab of rows that
# carries its kernel's neighbour rows above and below (see streaming.py); all frames at once.

def conv(p: Params, prefix: str, x: np.ndarray, kernel: int, depthwise: bool = False,
         pad_rows: bool = True) -> np.ndarray:
    """The 3D conv `prefix`, kernel k in T, H and W with k//2 replicated frames at each end:
    dense (`prefix.conv.*`) or depthwise-separable (`prefix.depthwise_conv.*` then
    `prefix.pointwise_conv.*`).   [T, H, W, Cin] -> [T, H', W, Cout]"""
    pad = (kernel // 2, kernel // 2)
    if not depthwise:
        return conv3d(x, p[f"{prefix}.conv.weight"], p[f"{prefix}.conv.bias"],
                      temporal_pad=pad, pad_rows=pad_rows)
    y = depthwise_conv3d(x, p[f"{prefix}.depthwise_conv.weight"],
                         p[f"{prefix}.depthwise_conv.bias"], pad, pad_rows)
    return linear(y, p[f"{prefix}.pointwise_conv.weight"], p[f"{prefix}.pointwise_conv.bias"])


def shortcut(p: Params, prefix: str, x: np.ndarray, eps: float, depthwise: bool) -> np.ndarray:
    """The skip of a channel-changing resnet: LayerNorm, then a 1x1x1 conv.
    [T, H, W, Cin] -> [T, H, W, Cout]"""
    b = f"{prefix}.conv_shortcut"
    s = layer_norm(x, p[f"{prefix}.norm3.weight"], p[f"{prefix}.norm3.bias"], eps)
    if depthwise:                                             # a 1x1x1 depthwise conv: c*w + b
        s = s * p[f"{b}.depthwise_conv.weight"].reshape(-1) + p[f"{b}.depthwise_conv.bias"]
        return linear(s, p[f"{b}.pointwise_conv.weight"], p[f"{b}.pointwise_conv.bias"])
    return linear(s, p[f"{b}.conv.weight"], p[f"{b}.conv.bias"])


def turbo_depth_to_space(x: np.ndarray) -> np.ndarray:
    """Turbo-VAED's decoupled 3D pixel shuffle, first frame dropped: channel c*8 + dy*4 + dx*2
    + dt of frame t goes to frame 2t + dt - 1, pixel (2h + dy, 2w + dx).
    [T, H, W, 8C] -> [2T - 1, 2H, 2W, C]"""
    T, H, W, C8 = x.shape
    x = x.reshape(T, H, W, C8 // 8, 2, 2, 2).transpose(0, 6, 1, 4, 2, 5, 3)   # [T,dt,H,dy,W,dx,c]
    return x.reshape(2 * T, 2 * H, 2 * W, C8 // 8)[1:]


def upsample(p: Params, prefix: str, x: np.ndarray, pad_rows: bool = True) -> np.ndarray:
    """The 3D upsampler: 3x3x3 conv C -> 8C, Turbo's 3D pixel shuffle.
    [T, H, W, C] -> [2T - 1, 2H', 2W, C]"""
    return turbo_depth_to_space(conv(p, f"{prefix}.conv", x, kernel=3, pad_rows=pad_rows))


def pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """torch's pixel_shuffle per frame, channel = c*r*r + dy*r + dx.
    [T, H, W, C*r*r] -> [T, H*r, W*r, C]"""
    T, H, W, C = x.shape
    x = x.reshape(T, H, W, C // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)   # [T, H, dy, W, dx, c]
    return x.reshape(T, H * r, W * r, C // (r * r))


def upsample_2d(p: Params, prefix: str, x: np.ndarray, pad_rows: bool = True) -> np.ndarray:
    """A 2D stage after its pixel norm + SiLU: per-frame 3x3 conv C -> C, pixel shuffle x2.
    [T, H, W, C] -> [T, 2H', 2W, C/4]"""
    y = conv2d(x, p[f"{prefix}.conv.weight"], p[f"{prefix}.conv.bias"], pad_rows)
    return pixel_shuffle(y, 2)


def pixel_norm_relu(x: np.ndarray) -> np.ndarray:
    """The pre-activation of conv1 in the resnets after an upsampler (Turbo's change to LTX)."""
    return relu(pixel_norm(x))


# ----------------------------------------------------------------------------- row streams

def stream_resnet(p: Params, prefix: str, slabs: Slabs, height: int, arch: Architecture,
                  depthwise: bool, relu_first: bool = False, project: bool = False) -> Slabs:
    """x + conv2(SiLU(norm(conv1(act(norm(x)))))) over row slabs; `project`: the skip is
    LayerNorm + 1x1x1 conv (the channel count changes).   [T, H, W, Cin] -> [T, H, W, Cout]"""
    kernel = arch.dw_kernel_size if depthwise else 3

    def branch(x: Slabs) -> Slabs:
        for name, pre in (("conv1", pixel_norm_relu if relu_first else pixel_norm_silu),
                          ("conv2", pixel_norm_silu)):
            layer = functools.partial(conv, p, f"{prefix}.{name}", kernel=kernel,
                                      depthwise=depthwise)
            x = stream_rows(layer, x, height, pre=pre, halo=kernel // 2)
        return x

    skip = functools.partial(shortcut, p, prefix, eps=arch.norm_eps, depthwise=depthwise)
    return stream_residual(slabs, branch, skip if project else None)


def build_stages(p: Params, arch: Architecture, latent: np.ndarray, slab_bytes: int
                 ) -> list[tuple[str, Slabs]]:
    """The decoder as a chain of named lazy row-slab streams over one latent [T, H, W, C]: each
    stream yields that stage's output, slab by slab. Nothing runs until a slab is read; a chain
    can be read once (reading a stage consumes the stages before it), so build a new one for
    every pass. Upsamplers get slabs of slab_bytes / 8, so their outputs stay within slab_bytes."""
    mid, *ups = arch.blocks
    height = latent.shape[1]
    conv3 = functools.partial(conv, p, kernel=3)
    x = stream_rows(functools.partial(conv3, "conv_in"), rechunk([latent], slab_bytes), height)
    chain = [("conv_in", x)]
    for j in range(mid.num_layers):
        x = stream_resnet(p, f"mid_block.resnets.{j}", x, height, arch, mid.depthwise)
    chain.append(("mid_block", x))
    for i, block in enumerate(ups):
        b = f"up_blocks.{i}"
        if block.in_channels != block.out_channels:
            x = stream_resnet(p, f"{b}.conv_in", x, height, arch, block.depthwise, project=True)
        if block.upsample:
            x = stream_rows(functools.partial(upsample, p, f"{b}.upsamplers.0"),
                            rechunk(x, slab_bytes // 8), height)
            height *= 2
        for j in range(block.num_layers):
            x = stream_resnet(p, f"{b}.resnets.{j}", x, height, arch, block.depthwise,
                              relu_first=block.upsample)
        chain.append((b, x))
    for stage in range(1, arch.num_2d_stages + 1):
        x = stream_rows(functools.partial(upsample_2d, p, f"upsampler2d_{stage}"), x, height,
                        pre=pixel_norm_silu)
        height *= 2
        chain.append((f"upsampler2d_{stage}", x))
    chain.append(("conv_out", stream_rows(functools.partial(conv3, "conv_out"), x, height,
                                          pre=pixel_norm_silu)))
    return chain


# ----------------------------------------------------------------------------- the decoder

class TurboVAEDDecoder:
    """A Turbo-VAED component folder (config.json + decoder weights): latent -> video."""

    def __init__(self, component: Component):
        cfg = component.config
        if cfg.get("_class_name") != CLASS_NAME:
            raise FormatError(f"{component.path}: not a {CLASS_NAME} config "
                              f"(_class_name {cfg.get('_class_name')!r:.80})")
        reference = {**official_config(), **UNSUPPORTED_FEATURES,
                     "decoder_spatio_temporal_scaling": [True], "decoder_is_dw_conv": [False]}
        check_config(cfg, reference, str(component.path),
                     required=("decoder_block_out_channels", "decoder_layers_per_block"))
        try:
            self.arch = architecture(cfg)
        except FormatError as e:  # name the folder
            raise FormatError(f"{component.path}: {e}") from None
        found = {k: s for k, s in component.shapes().items() if not k.startswith(DISTILLATION_ONLY)}
        check_tensors(found, param_shapes(cfg), str(component.path))
        self.params, self.config = component, cfg
        upsamplers = sum(block.upsample for block in self.arch.blocks)
        self.latent_channels = self.arch.latent_channels
        self.temporal_compression = 2 ** upsamplers
        self.spatial_compression = 2 ** (upsamplers + self.arch.num_2d_stages)

    def output_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, C, T, H, W] latent -> [B, 3, (T-1)*8 + 1, 32*H, 32*W] video (official sizes)."""
        B, _, T, H, W = latent_shape
        s = self.spatial_compression
        return B, self.arch.out_channels, (T - 1) * self.temporal_compression + 1, H * s, W * s

    def stages(self, latent: np.ndarray, slab_bytes: int = SLAB_BYTES
               ) -> list[tuple[str, Slabs]]:
        """Named per-stage row-slab streams for one latent [C, T, H, W] (for inspection and
        tests; see build_stages)."""
        return build_stages(self.params, self.arch,
                            np.ascontiguousarray(latent.transpose(1, 2, 3, 0)), slab_bytes)

    def decode(self, latent: np.ndarray, progress: Progress | None = None,
               slab_bytes: int = SLAB_BYTES) -> np.ndarray:
        """Latent [B, C, T, H, W] -> video [B, 3, (T-1)*8 + 1, 32*H, 32*W], roughly in [-1, 1],
        streamed over row slabs of about `slab_bytes` (see the module docstring; a slab_bytes
        over 8x the largest activation runs every layer on whole tensors). progress("decode",
        rows done, rows in all, seconds) after each slab of output rows, counted over the whole
        batch."""
        latent = np.asarray(latent, dtype=np.float32)
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels or 0 in latent.shape:
            raise TinyI2VError(f"latent must be [B, {self.latent_channels}, T, H, W] with no "
                               f"empty axis, got {list(latent.shape)}")
        video = np.empty(self.output_shape(latent.shape), dtype=np.float32)
        B, H = video.shape[0], video.shape[3]
        report, start = progress or (lambda *a: None), time.perf_counter()
        for b in range(B):
            _, out = self.stages(latent[b], slab_bytes)[-1]
            for rows in write_rows(out, video[b]):
                report("decode", b * H + rows, B * H, time.perf_counter() - start)
        return video

    def encode(self, *args, **kwargs):
        raise TinyI2VError("Turbo-VAED is a decoder only; encode with the LTX-Video VAE's encoder")
