"""Independent torch implementation of the Turbo-VAED-LTX decoder (whole tensors, float32).

Written from `docs/ltx-vae.md` §3 (shared docs) and the maths of the numpy port
(`tinyi2v/vae/turbo_vaed.py`), not from the upstream code. It is the reference our streaming numpy
decoder is benchmarked against. The module tree mirrors the upstream decoder, so its
`state_dict()` keys equal the decoder-level names of `tinyi2v.vae.turbo_vaed.param_shapes(cfg)`
(`conv_in.conv.weight`, `mid_block.resnets.0.conv1.depthwise_conv.weight`,
`up_blocks.3.upsamplers.0.conv.conv.weight`, `upsampler2d_1.conv.weight`, ...) and the same
safetensors file loads with `load_state_dict(..., strict=True)`.

    model = TurboVAEDDecoderTorch(config)            # config.json dict (upstream layout)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    video = model(latent)                            # [B, C, T, H, W] -> [B, 3, T', H', W']

Unlike the numpy port it computes every stage over the whole clip at once (no row streaming),
so its memory grows with the clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinyi2v.vae.turbo_vaed import DISTILLATION_ONLY, Architecture, architecture

PIXEL_NORM_EPS = 1e-8


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over the channel axis (dim 1), no weights, eps 1e-8."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + PIXEL_NORM_EPS)


def pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Replicate the first and the last frame `pad` times each (the non-causal temporal pad)."""
    if pad == 0:
        return x
    first, last = x[:, :, :1], x[:, :, -1:]
    return torch.cat([first] * pad + [x] + [last] * pad, dim=2)


class Conv3d(nn.Module):
    """A k x k x k conv with replicate temporal padding (k//2 edge frames each side) and zero
    spatial padding: dense (`conv`) or depthwise-separable (`depthwise_conv`, `pointwise_conv`).
    [B, Cin, T, H, W] -> [B, Cout, T, H, W]"""

    def __init__(self, c_in: int, c_out: int, kernel: int, depthwise: bool = False):
        super().__init__()
        self.pad, self.depthwise = kernel // 2, depthwise
        spatial = (0, kernel // 2, kernel // 2)
        if depthwise:
            self.depthwise_conv = nn.Conv3d(c_in, c_in, kernel, padding=spatial, groups=c_in)
            self.pointwise_conv = nn.Conv3d(c_in, c_out, 1)
        else:
            self.conv = nn.Conv3d(c_in, c_out, kernel, padding=spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_time(x, self.pad)
        if self.depthwise:
            return self.pointwise_conv(self.depthwise_conv(x))
        return self.conv(x)


class Resnet(nn.Module):
    """x + conv2(SiLU(norm(conv1(act(norm(x)))))), act = ReLU after an upsampler, else SiLU.
    Changing channels, the shortcut is an affine LayerNorm over channels + a 1x1x1 conv."""

    def __init__(self, c_in: int, c_out: int, depthwise: bool, dw_kernel: int, eps: float,
                 relu_first: bool = False):
        super().__init__()
        kernel = dw_kernel if depthwise else 3
        self.relu_first = relu_first
        self.conv1 = Conv3d(c_in, c_out, kernel, depthwise)
        self.conv2 = Conv3d(c_out, c_out, kernel, depthwise)
        if c_in != c_out:
            self.norm3 = nn.LayerNorm(c_in, eps=eps)
            self.conv_shortcut = Conv3d(c_in, c_out, 1, depthwise)
        else:
            self.norm3 = self.conv_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = pixel_norm(x)
        h = self.conv1(F.relu(h) if self.relu_first else F.silu(h))
        h = self.conv2(F.silu(pixel_norm(h)))
        if self.conv_shortcut is not None:
            x = self.norm3(x.movedim(1, -1)).movedim(-1, 1)
            x = self.conv_shortcut(x)
        return h + x


class Upsampler3d(nn.Module):
    """3x3x3 conv C -> 8C, the decoupled 3D pixel shuffle (channel c*8 + dy*4 + dx*2 + dt),
    first frame dropped.   [B, C, T, H, W] -> [B, C, 2T-1, 2H, 2W]"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3d(channels, 8 * channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        B, C8, T, H, W = y.shape
        C = C8 // 8
        y = y.reshape(B, C, 2, 2, 2, T, H, W)                 # [B, c, dy, dx, dt, T, H, W]
        y = y.permute(0, 1, 5, 4, 6, 2, 7, 3)                 # [B, c, T, dt, H, dy, W, dx]
        y = y.reshape(B, C, 2 * T, 2 * H, 2 * W)
        return y[:, :, 1:]


class UpBlock(nn.Module):
    """Optional channel-changing resnet (`conv_in`), optional upsampler, `num_layers` resnets."""

    def __init__(self, c_in: int, c_out: int, num_layers: int, upsample: bool, depthwise: bool,
                 dw_kernel: int, eps: float):
        super().__init__()
        self.conv_in = (Resnet(c_in, c_out, depthwise, dw_kernel, eps)
                        if c_in != c_out else None)
        self.upsamplers = nn.ModuleList([Upsampler3d(c_out)]) if upsample else None
        self.resnets = nn.ModuleList(
            Resnet(c_out, c_out, depthwise, dw_kernel, eps, relu_first=upsample)
            for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, num_layers: int, depthwise: bool, dw_kernel: int,
                 eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(Resnet(channels, channels, depthwise, dw_kernel, eps)
                                     for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class Upsampler2d(nn.Module):
    """Pixel norm, SiLU, per-frame 3x3 Conv2d C -> C, pixel shuffle x2 (c*4 + dy*2 + dx).
    [B, C, T, H, W] -> [B, C/4, T, 2H, 2W]"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        y = F.silu(pixel_norm(x)).transpose(1, 2).reshape(B * T, C, H, W)
        y = F.pixel_shuffle(self.conv(y), 2)                  # [B*T, C/4, 2H, 2W]
        return y.reshape(B, T, C // 4, 2 * H, 2 * W).transpose(1, 2)


class TurboVAEDDecoderTorch(nn.Module):
    """The Turbo-VAED decoder from a config.json dict in the upstream layout (lists in encoder
    order, read by `tinyi2v.vae.turbo_vaed.architecture`). Latent [B, C, T, H, W] -> video
    [B, 3, (T-1)*8 + 1, 32*H, 32*W] (official config), float32, whole tensors."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        arch: Architecture = architecture(cfg)
        self.arch = arch
        k, eps = arch.dw_kernel_size, arch.norm_eps
        mid, *ups = arch.blocks
        self.conv_in = Conv3d(arch.latent_channels, mid.in_channels, 3)
        self.mid_block = MidBlock(mid.in_channels, mid.num_layers, mid.depthwise, k, eps)
        self.up_blocks = nn.ModuleList(
            UpBlock(b.in_channels, b.out_channels, b.num_layers, b.upsample, b.depthwise, k, eps)
            for b in ups)
        c = arch.blocks[-1].out_channels
        for stage in range(1, arch.num_2d_stages + 1):
            setattr(self, f"upsampler2d_{stage}", Upsampler2d(c))
            c //= 4
        self.conv_out = Conv3d(c, arch.out_channels, 3)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(latent))
        for block in self.up_blocks:
            x = block(x)
        for stage in range(1, self.arch.num_2d_stages + 1):
            x = getattr(self, f"upsampler2d_{stage}")(x)
        return self.conv_out(F.silu(pixel_norm(x)))

    @classmethod
    def from_component(cls, path) -> TurboVAEDDecoderTorch:
        """A tinyi2v component folder (config.json + weights, e.g. FP16): weights upcast to
        float32, loaded strictly (distillation-only heads skipped), eval mode."""
        from tinyi2v.weights import Component

        comp = Component(Path(path))
        with torch.device("meta"):
            model = cls(comp.config)
        model.load_state_dict(
            {k: torch.from_numpy(np.array(comp[k], dtype=np.float32)) for k in comp
             if not k.startswith(DISTILLATION_ONLY)}, strict=True, assign=True)
        return model.eval()
