"""Independent torch implementation of the official MobileI2V denoiser ("Mobiledit").

Written from `docs/mobilei2v-denoiser.md` (shared docs), not from the upstream code. It is the
float reference the numpy runtime is tested and benchmarked against, and the model we train.
Parameter names equal the official state-dict keys of the live parameters, so an official
checkpoint loads with `MobileI2VDenoiser.load_official_state_dict`.

Differences from the official class that do not change the float32 maths (spec §11, §13):
- the caption path (`y_embedder`, `attention_y_norm`) and the dead sin-cos buffers are absent;
- the t/flow MLPs run once per distinct value and are gathered per token;
- T, H, W come from the input (no hard-coded 3x23x40 / 2760 tokens);
- softmax probabilities stay in the attention dtype (no float16 rounding).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyi2v.denoiser import is_dead_key


Grid = tuple[int, int, int]


def _attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """The official config runs attention in fp32; never go below that (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[...] -> [..., dim] features [cos(v*f_j), sin(v*f_j)], f_j = exp(-ln(max_period)*j/half), in fp32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.float()[..., None] * freqs  # [...] -> [..., half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(
    grid: Grid,
    head_dim: int,
    scales: Sequence[float],
    theta: float,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, head_dim] for 3D RoPE on a frame-major T x H x W token grid.

    The head is split into 3 chunks (frame, row, column); each chunk rotates its two halves with
    angles p * theta^(-2j/D), where p = index / scale for its axis.
    """
    chunk = head_dim // 3
    t, h, w = grid
    axes = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32, device=device) for n in (t, h, w)), indexing="ij"
    )
    inv_freq = 1.0 / theta ** (torch.arange(0, chunk, 2, dtype=torch.float32, device=device) / chunk)
    angles = []
    for positions, scale in zip(axes, scales):
        angle = (positions.reshape(-1) / scale)[:, None] * inv_freq  # [N] -> [N, chunk/2]
        angles.append(torch.cat([angle, angle], dim=-1))  # both halves of a chunk share angles
    angle = torch.cat(angles, dim=-1)  # [N, head_dim]
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE per 1/3 chunk of the head: x [B, heads, N, D], cos/sin [N, D]."""
    x1, x2 = x.unflatten(-1, (3, 2, -1)).unbind(-2)  # each [B, heads, N, 3, D/6]
    rotated = torch.stack([-x2, x1], dim=-2).flatten(-3)  # [B, heads, N, D]
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gain, normalised in fp32 (Sana's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(_attention_dtype(x.dtype))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar, then Linear-SiLU-Linear (`t_embedder` / `flow_embedder`)."""

    def __init__(self, hidden_size: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(values, self.freq_dim)  # [U] -> [U, freq_dim]
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # [U, freq_dim] -> [U, C]


class PatchEmbed(nn.Module):
    """Patch size 1: a 1x1 conv, i.e. a per-token linear map (kept as Conv2d for the key names)."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)  # [B, Cin, T, H, W] -> [B, N, Cin]
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)  # -> [B, N, C]


class ConvLayer(nn.Module):
    """Holds one Conv2d as `conv`, matching the official `ConvLayer` key names."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def pointwise(self, tokens: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv applied to channels-last tokens as a matmul: [..., Cin] -> [..., Cout]."""
        return F.linear(tokens, self.conv.weight.flatten(1), self.conv.bias)


class GLUMBConv(nn.Module):
    """1x1 conv + SiLU, depthwise 3x3 per latent frame, SiLU-gated GLU, 1x1 conv (no bias)."""

    def __init__(self, hidden_size: int, ffn: int) -> None:
        super().__init__()
        self.inverted_conv = ConvLayer(hidden_size, 2 * ffn, 1)
        self.depth_conv = ConvLayer(2 * ffn, 2 * ffn, 3, groups=2 * ffn)
        self.point_conv = ConvLayer(ffn, hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, n, _ = x.shape
        t, h, w = grid
        hidden = F.silu(self.inverted_conv.pointwise(x))  # [B, N, C] -> [B, N, 2F]
        # Frames fold into the batch: the 3x3 conv (zero padded) never mixes frames.
        images = hidden.reshape(b * t, h, w, -1).permute(0, 3, 1, 2)  # -> [B*T, 2F, H, W] channels-last
        hidden = self.depth_conv(images).permute(0, 2, 3, 1).reshape(b, n, -1)  # -> [B, N, 2F]
        value, gate = hidden.chunk(2, dim=-1)  # 2 x [B, N, F]
        return self.point_conv.pointwise(value * F.silu(gate))  # [B, N, F] -> [B, N, C]


class LiteLA(nn.Module):
    """ReLU linear attention with q/k RMSNorm and 3D RoPE (blocks other than the softmax ones)."""

    def __init__(self, hidden_size: int, head_dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_norm = RMSNorm(hidden_size)
        self.k_norm = RMSNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, N, C] -> 3 x [B, N, C]
        q, k = self.q_norm(q), self.k_norm(k)  # normalised over all C channels, before the head split
        dtype = _attention_dtype(x.dtype)
        # [B, N, C] -> [B, heads, N, d]; head i = channels d*i .. d*i + d-1
        q, k, v = (s.reshape(b, n, -1, self.head_dim).transpose(1, 2).to(dtype) for s in (q, k, v))
        # RoPE first, ReLU feature map second (official order).
        q = F.relu(apply_rope(q, *rope))
        k = F.relu(apply_rope(k, *rope))
        kv = k.transpose(-1, -2) @ v  # [B, h, d, N] @ [B, h, N, d] -> [B, h, d, d]
        k_sum = k.sum(dim=-2, keepdim=True)  # [B, h, 1, d]
        denominator = (q * k_sum).sum(dim=-1, keepdim=True)  # phi(q_n) . sum_m phi(k_m): [B, h, N, 1]
        out = (q @ kv) / (denominator + self.eps)  # [B, h, N, d]
        out = out.to(x.dtype).transpose(1, 2).reshape(b, n, c)  # merge heads: channel = d*head + i
        return self.proj(out).clamp(-65504.0, 65504.0)  # official float16 guard, a no-op in practice


class SoftmaxAttention(nn.Module):
    """Full spatio-temporal softmax attention with 3D RoPE, no q/k norm (blocks 7 and 15)."""

    def __init__(self, hidden_size: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        dtype = _attention_dtype(x.dtype)
        qkv = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # -> [3, B, h, N, d]
        q, k, v = qkv.to(dtype).unbind(0)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # [B, h, N, d]
        out = out.to(x.dtype).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class MobileI2VBlock(nn.Module):
    """adaLN-single block: modulated attention then modulated GLUMBConv, both gated residuals."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden_size: int, softmax: bool) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))
        self.attn = SoftmaxAttention(hidden_size, head_dim) if softmax else LiteLA(hidden_size, head_dim)
        self.mlp = GLUMBConv(hidden_size, mlp_hidden_size)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], grid: Grid
    ) -> torch.Tensor:
        # cond = t0 + f0 per token [B, N, 6C]; rows: shift/scale/gate for attention, then for the FFN.
        modulation = self.scale_shift_table + cond.unflatten(-1, (6, -1))  # -> [B, N, 6, C]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = modulation.unbind(-2)
        c = x.shape[-1]
        a = F.layer_norm(x, (c,), eps=1e-6) * (1 + scale_a) + shift_a
        x = x + gate_a * self.attn(a, rope)
        m = F.layer_norm(x, (c,), eps=1e-6) * (1 + scale_f) + shift_f
        return x + gate_f * self.mlp(m, grid)


class FinalLayer(nn.Module):
    """LayerNorm modulated by the per-token timestep embedding (no flow term), then Linear."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # [2, C] + [B, N, 1, C] -> [B, N, 2, C] -> 2 x [B, N, C]
        shift, scale = (self.scale_shift_table + temb[..., None, :]).unbind(-2)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
        return self.linear(x)  # [B, N, C] -> [B, N, Cout]


class MobileI2VDenoiser(nn.Module):
    """The official MobileI2V denoiser: a flat hybrid linear/softmax DiT predicting v = noise - data."""

    def __init__(
        self,
        in_channels: int = 128,
        out_channels: int | None = None,
        hidden_size: int = 1152,
        head_dim: int = 72,
        mlp_hidden_size: int = 2880,
        num_blocks: int = 16,
        softmax_blocks: Sequence[int] = (7, 15),
        freq_dim: int = 256,
        rope_scales: Sequence[float] = (1.0, 1.4375, 2.5),
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if hidden_size % head_dim or head_dim % 6:
            raise ValueError(
                f"hidden_size {hidden_size} must be a multiple of head_dim {head_dim}, itself a multiple of 6"
            )
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.softmax_blocks = tuple(softmax_blocks)
        self.rope_scales = tuple(rope_scales)
        self.rope_theta = rope_theta

        self.x_embedder = PatchEmbed(in_channels, hidden_size)
        self.t_embedder = ScalarEmbedder(hidden_size, freq_dim)
        self.flow_embedder = ScalarEmbedder(hidden_size, freq_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.flow_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.blocks = nn.ModuleList(
            MobileI2VBlock(hidden_size, head_dim, mlp_hidden_size, softmax=i in self.softmax_blocks)
            for i in range(num_blocks)
        )
        self.final_layer = FinalLayer(hidden_size, self.out_channels)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "MobileI2VDenoiser":
        """Build from a tinyi2v transformer config.json (the runtime's own config): the
        constructor's keywords are read from it, the runtime-only keys are ignored."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load an official `Mobiledit` state dict: drop its dead entries, then load strictly."""
        live = {
            key: value
            for key, value in state_dict.items()
            if not is_dead_key(key)
        }
        return self.load_state_dict(live, strict=True)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond_mask: torch.Tensor,
        flow_score: torch.Tensor,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, Cin, T, H, W], timestep [B] (0..1000), cond_mask [B or 1, N] (1 on guide tokens),
        flow_score [B] -> velocity [B, Cout, T, H, W].

        With `return_intermediates`, also returns the tensors of the parity fixture
        (`case_*_intermediates.npz`) under its key names.
        """
        b, _, t, h, w = x.shape
        grid = (t, h, w)

        # Per-token sigma: guide tokens get t = 0 (spec §4.3); the embedder sees t / 1000.
        timestep = timestep.to(device=x.device, dtype=torch.float32)
        cond_mask = cond_mask.to(device=x.device, dtype=torch.float32)
        sigma = torch.minimum(timestep[:, None], (1 - cond_mask) * 1000) / 1000  # [B, N]
        # Only a few distinct sigmas / flow scores exist: run the MLPs once per distinct value.
        sigma_values, sigma_index = torch.unique(sigma, return_inverse=True)  # [U], [B, N]
        temb_rows = self.t_embedder(sigma_values)  # [U] -> [U, C]
        t0_rows = self.t_block(temb_rows)  # [U, C] -> [U, 6C]
        flow = flow_score.to(device=x.device, dtype=torch.float32)
        flow_values, flow_index = torch.unique(flow, return_inverse=True)  # [Uf], [B]
        femb_rows = self.flow_embedder(flow_values)  # [Uf] -> [Uf, C]
        f0_rows = self.flow_block(femb_rows)  # [Uf, C] -> [Uf, 6C]

        # F.embedding = rows[index]; its backward is a segmented sum made for many tokens sharing
        # few rows, where indexing's took 21% of an eager H200 teacher step (train/README.md)
        temb = F.embedding(sigma_index, temb_rows)  # [B, N, C], also conditions the final layer
        cond = F.embedding(sigma_index, t0_rows) + f0_rows[flow_index][:, None]  # [B, N, 6C]
        rope = rope_tables(grid, self.head_dim, self.rope_scales, self.rope_theta, device=x.device)

        hidden = self.x_embedder(x)  # [B, Cin, T, H, W] -> [B, N, C]
        saved = {"after_patch_embed": hidden}
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, cond, rope, grid)
            if i in (0, 7):
                saved[f"after_block_{i}"] = hidden
        saved["before_final_layer"] = hidden
        out = self.final_layer(hidden, temb)  # [B, N, C] -> [B, N, Cout]
        velocity = out.reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)  # -> [B, Cout, T, H, W]
        if not return_intermediates:
            return velocity

        rows = torch.tensor([0, h * w], device=x.device)  # a guide token and the first noisy token
        saved["final_layer_out"] = out
        saved["t_embedder_rows"] = temb[:, rows]
        saved["t_block_rows"] = t0_rows[sigma_index[:, rows]]
        saved["flow_embedder_row"] = femb_rows[flow_index][:, None]
        saved["flow_block_row"] = f0_rows[flow_index][:, None]
        return velocity, saved


def init_random_(model: MobileI2VDenoiser, seed: int) -> MobileI2VDenoiser:
    """Random init following the parity fixture's rules (not its exact draws).

    Weights N(0, 1/fan_in) with fan_in = prod(shape[1:]); biases N(0, 0.01); RMSNorm gains
    1 + N(0, 0.04); scale_shift_tables N(0, 0.04). Draws on CPU so the result is device independent.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("scale_shift_table"):
                value = 0.2 * noise
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                value = 1 + 0.2 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            else:
                value = noise / math.sqrt(math.prod(param.shape[1:]))
            param.copy_(value)
    return model
