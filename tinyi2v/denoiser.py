"""The MobileI2V denoiser ("Mobiledit", hustvl/MobileI2V @ 7bd4d06) as plain functions over a dict.

A Sana-style flat DiT on LTX-VAE latents with patch size 1: every latent voxel is a token.
16 blocks, each `x + gate * attention(adaLN(x))` then `x + gate * GLUMBConv(adaLN(x))`; 14 blocks
use ReLU linear attention (O(N)), blocks 7 and 15 full softmax attention (O(N^2)); both with 3D
RoPE. Every token is modulated by its own timestep (the guide frame sits at t = 0) plus a
motion ("flow score") embedding. The output is the flow velocity v = noise - data.

`p` maps the official checkpoint names to float32 arrays (an FP16 file is upcast tensor by tensor
as each is read, see `weights.py`); `cfg` is the component's config.json. The specification these
functions follow, with every deviation of the official code, is ../shared/docs/mobilei2v-denoiser.md
(section numbers below refer to it). Shapes: B batch, N = T*H*W tokens (frame-major), D hidden,
R distinct timestep rows (2 per sample: guide and noisy).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from . import ops
from .errors import FormatError, TinyI2VError
from .ops.blas import split_run
from .weights import Component, check_config, check_tensors, component_dir

Params = Mapping[str, np.ndarray]

CLASS_NAME = "MobileI2VTransformer"


def is_dead_key(name: str) -> bool:
    """Entries of the official checkpoint that the forward pass never reads (spec §4.5, §13):
    unused sin-cos tables and the caption path, whose output no block consumes."""
    return (name in ("pos_embed", "pos_embed_temporal")
            or name.startswith(("y_embedder.", "attention_y_norm.")))


def official_config(in_channels: int = 128, hidden_size: int = 1152, num_blocks: int = 16,
                    softmax_blocks: tuple[int, ...] = (7, 15), mlp_hidden_size: int = 2880,
                    out_channels: int | None = None, freq_dim: int = 256) -> dict:
    """A transformer config.json; the defaults are the official 300M model."""
    return {
        "_class_name": CLASS_NAME,
        "in_channels": in_channels,
        "out_channels": in_channels if out_channels is None else out_channels,
        "hidden_size": hidden_size,
        "head_dim": 72,                                   # hard-coded upstream (spec §2.4)
        "num_blocks": num_blocks,
        "softmax_blocks": list(softmax_blocks),
        "mlp_hidden_size": mlp_hidden_size,
        "freq_dim": freq_dim,
        "rope_scales": [1.0, 1.4375, 2.5],               # trained (t, h, w) position scales
        "rope_theta": 10000.0,
        "norm_eps": 1e-6,
        "qk_norm_eps": 1e-5,
        "linear_attention_eps": 1e-8,
    }


def param_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its shape, under the official names."""
    C, D, F = cfg["in_channels"], cfg["hidden_size"], cfg["mlp_hidden_size"]
    shapes = {"x_embedder.proj.weight": (D, C, 1, 1), "x_embedder.proj.bias": (D,)}
    for emb in ("t", "flow"):
        shapes |= {f"{emb}_embedder.mlp.0.weight": (D, cfg["freq_dim"]),
                   f"{emb}_embedder.mlp.0.bias": (D,),
                   f"{emb}_embedder.mlp.2.weight": (D, D), f"{emb}_embedder.mlp.2.bias": (D,),
                   f"{emb}_block.1.weight": (6 * D, D), f"{emb}_block.1.bias": (6 * D,)}
    for i in range(cfg["num_blocks"]):
        b = f"blocks.{i}."
        shapes |= {b + "scale_shift_table": (6, D), b + "attn.qkv.weight": (3 * D, D),
                   b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                   b + "mlp.inverted_conv.conv.weight": (2 * F, D, 1, 1),
                   b + "mlp.inverted_conv.conv.bias": (2 * F,),
                   b + "mlp.depth_conv.conv.weight": (2 * F, 1, 3, 3),
                   b + "mlp.depth_conv.conv.bias": (2 * F,),
                   b + "mlp.point_conv.conv.weight": (D, F, 1, 1)}
        if i in cfg["softmax_blocks"]:
            shapes[b + "attn.qkv.bias"] = (3 * D,)
        else:
            shapes |= {b + "attn.q_norm.weight": (D,), b + "attn.k_norm.weight": (D,)}
    shapes |= {"final_layer.scale_shift_table": (2, D),
               "final_layer.linear.weight": (cfg["out_channels"], D),
               "final_layer.linear.bias": (cfg["out_channels"],)}
    return shapes


def flops(cfg: Mapping, latent_shape: tuple[int, ...]) -> int:
    """Useful floating-point operations (2 per multiply-add) of one forward on a latent
    [B, C, T, H, W]: the matrix products and the depthwise convolution, which are all but ~0.1%
    of the work (spec §10: 1437.4 GFLOP for the official model at 2760 tokens)."""
    B, C, T, H, W = latent_shape
    N, D, F, hd = T * H * W, cfg["hidden_size"], cfg["mlp_hidden_size"], cfg["head_dim"]
    per_block = 2 * N * D * (3 * D + D + 2 * F) + 2 * N * F * D + 2 * N * 2 * F * 9
    softmax = len(cfg["softmax_blocks"])
    attention = softmax * 4 * N * N * D + (cfg["num_blocks"] - softmax) * 4 * N * D * hd
    ends = 2 * N * C * D + 2 * N * D * cfg["out_channels"]    # patch embedding, final layer
    return B * (cfg["num_blocks"] * per_block + attention + ends)


# ----------------------------------------------------------------------------- small pieces

def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w^T (+ b); a 1x1 convolution weight [out, in, 1, 1] is a linear layer too."""
    y = x @ w.reshape(w.shape[0], -1).T                       # [..., in] -> [..., out]
    if b is not None:
        y += b
    return y


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def sinusoidal_features(s: np.ndarray, dim: int) -> np.ndarray:
    """[R] -> [R, dim]: [cos(s*f_j), sin(s*f_j)], f_j = 10000^(-j/(dim/2)); cosines first (§4.3)."""
    half = dim // 2
    freqs = np.exp(-np.log(np.float32(10000.0)) * np.arange(half, dtype=np.float32) / half)
    angles = s.astype(np.float32)[:, None] * freqs[None]     # [R, half]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)


def embed_scalar(p: Params, name: str, s: np.ndarray, freq_dim: int) -> np.ndarray:
    """Timestep / flow-score embedder: sinusoid -> Linear -> SiLU -> Linear.   [R] -> [R, D]."""
    e = silu(linear(sinusoidal_features(s, freq_dim), p[f"{name}.mlp.0.weight"],
                    p[f"{name}.mlp.0.bias"]))                 # [R, 256] -> [R, D]
    return linear(e, p[f"{name}.mlp.2.weight"], p[f"{name}.mlp.2.bias"])   # [R, D]


def rope_tables(T: int, H: int, W: int, head_dim: int, scales, theta: float):
    """cos, sin [N, 3, K] for the (t, h, w) chunks of a head (K = head_dim / 6 frequencies)."""
    K = head_dim // 6
    omega = theta ** (-np.arange(K) * 2.0 / (2 * K))          # [K], per chunk of 2K channels
    t, h, w = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    pos = np.stack([t.ravel() / scales[0], h.ravel() / scales[1], w.ravel() / scales[2]], -1)
    angles = pos[:, :, None] * omega                          # [N, 3] -> [N, 3, K]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ----------------------------------------------------------------------------- attention + FFN

def linear_attention_block(p: Params, b: str, a: np.ndarray, rope, cfg: Mapping) -> np.ndarray:
    """LiteLA (§4.7): qkv, q/k RMSNorm, RoPE, ReLU features, O(N) attention, proj. [B,N,D]->[B,N,D]"""
    B, N, D = a.shape
    nh, hd = D // cfg["head_dim"], cfg["head_dim"]
    qkv = linear(a, p[b + "attn.qkv.weight"])                  # [B, N, D] -> [B, N, 3D]
    q, k = ops.qk_norm_rope(qkv.reshape(B, N, 3, nh, hd), p[b + "attn.q_norm.weight"],
                            p[b + "attn.k_norm.weight"], cfg["qk_norm_eps"],
                            *rope)                            # RMSNorm, RoPE, ReLU: [B, N, heads, hd]
    v = qkv[..., 2 * D:].reshape(B, N, nh, hd)                # a view: only GEMMs read it
    o = ops.linear_attention(q, k, v, cfg["linear_attention_eps"])   # [B, N, heads, hd]
    o = linear(o.reshape(B, N, D), p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
    return np.clip(o, -65504.0, 65504.0, out=o)               # the official fp16 guard (no-op)


def softmax_attention_block(p: Params, b: str, a: np.ndarray, rope, cfg: Mapping,
                            query_chunk: int = 256) -> np.ndarray:
    """Full softmax attention (§4.8) with RoPE. One head and `query_chunk` queries at a time:
    the [chunk, N] scores stay in cache through max and exp, and memory is O(chunk * N) per
    thread (the heads are shared out over BLAS's threads, see ops/blas.py). The row sums come
    out of the value product: v gets a column of ones, so one GEMM gives the unnormalised
    output and its denominator, and the division touches [chunk, hd] values.

    Scores more than 80 below their row's maximum are raised to -80 before the exp: their
    weights (under 2e-35 of the largest, far below float32's resolution of the row sum, so the
    result does not change) would otherwise be subnormal floats, which x86 CPUs multiply ~100x
    slower. A trained model's scores can span 150 or more: in the demo model's first softmax
    block they made the block 7x slower (0.29 against 0.04 s)."""
    B, N, D = a.shape
    nh, hd = D // cfg["head_dim"], cfg["head_dim"]
    qkv = linear(a, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])   # [B, N, 3D]
    q = ops.rope3d(qkv[..., :D].reshape(B, N, nh, hd), *rope)          # [B, N, heads, hd]
    k = ops.rope3d(qkv[..., D:2 * D].reshape(B, N, nh, hd), *rope)
    v = qkv[..., 2 * D:].reshape(B, N, nh, hd)
    q *= np.float32(hd ** -0.5)
    o = np.empty((B, N, nh, hd), dtype=np.float32)

    def heads(share: range) -> None:                          # one thread's (sample, head) pairs
        v1 = np.ones((N, hd + 1), dtype=np.float32)          # [N, hd | 1]
        scores = np.empty((min(query_chunk, N), N), dtype=np.float32)
        sums = np.empty((min(query_chunk, N), hd + 1), dtype=np.float32)
        for i, h in (divmod(j, nh) for j in share):
            kt = np.ascontiguousarray(k[i, :, h].T)           # [hd, N]
            v1[:, :hd] = v[i, :, h]
            for s in range(0, N, query_chunk):
                n = min(query_chunk, N - s)
                e, r = scores[:n], sums[:n]
                np.matmul(q[i, s:s + n, h], kt, out=e)        # [n, hd] @ [hd, N] -> [n, N]
                e -= e.max(axis=1, keepdims=True)             # exp(e) <= 1: cannot overflow
                np.maximum(e, np.float32(-80.0), out=e)       # no subnormal exp(e)
                np.exp(e, out=e)
                np.matmul(e, v1, out=r)                       # [n, N] @ [N, hd + 1]
                np.divide(r[:, :hd], r[:, hd:], out=o[i, s:s + n, h])   # [n, hd] / row sums

    split_run(heads, B * nh)                                  # heads over threads (ops/blas.py)
    return linear(o.reshape(B, N, D), p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])


def glumbconv(p: Params, b: str, m: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """GLUMBConv FFN (§4.10), per latent frame: 1x1 up + SiLU, depthwise 3x3, SiLU-gated GLU,
    1x1 down.   [B, N, D] -> [B, N, D]"""
    B, N, D = m.shape
    T, H, W = grid
    u = linear(m, p[b + "mlp.inverted_conv.conv.weight"])    # [B, N, D] -> [B, N, 2F]
    ops.bias_silu_(u, p[b + "mlp.inverted_conv.conv.bias"])
    g = ops.depthwise_silu_gate(u.reshape(B * T, H, W, -1),  # frames are independent images
                                p[b + "mlp.depth_conv.conv.weight"][:, 0],
                                p[b + "mlp.depth_conv.conv.bias"])   # [B*T, H, W, 2F] -> [.., F]
    return linear(g.reshape(B, N, -1), p[b + "mlp.point_conv.conv.weight"])   # [B, N, D]


def block(p: Params, i: int, h: np.ndarray, mod: np.ndarray, index: np.ndarray, rope,
          grid: tuple[int, int, int], cfg: Mapping) -> None:
    """One DiT block (§4.6), updating the residual stream h [B, N, D] in place.

    mod [B, R, 6D]: t0 + f0 rows of this sample; index [B, N] picks each token's row.
    """
    b = f"blocks.{i}."
    B, R, _ = mod.shape
    m6 = mod.reshape(B, R, 6, -1) + p[b + "scale_shift_table"]   # [B, R, 6, D]
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (m6[:, :, j] for j in range(6))
    a = ops.layernorm_modulate(h, shift_a, scale_a, index, cfg["norm_eps"])
    attention = softmax_attention_block if i in cfg["softmax_blocks"] else linear_attention_block
    ops.gated_add_(h, attention(p, b, a, rope, cfg), gate_a, index)
    m = ops.layernorm_modulate(h, shift_f, scale_f, index, cfg["norm_eps"])
    ops.gated_add_(h, glumbconv(p, b, m, grid), gate_f, index)


# ----------------------------------------------------------------------------- the whole model

def conditioning(p: Params, timestep: np.ndarray, cond_mask: np.ndarray, flow_score: np.ndarray,
                 cfg: Mapping):
    """Per-token conditioning as distinct rows (§4.3, §4.4, §13).

    Returns temb [R, D] (timestep embedding rows, for the final layer), mod [B, R, 6D]
    (t_block + flow_block rows, for the blocks) and index [B, N] (each token's row).
    """
    t_tok = np.minimum(timestep[:, None].astype(np.float32),
                       (1.0 - cond_mask.astype(np.float32)) * 1000.0)   # [B, N], guide -> 0
    sigmas, index = np.unique(t_tok / np.float32(1000.0), return_inverse=True)   # [R], [B*N]
    index = index.reshape(t_tok.shape)                         # [B, N] (a [1, N] mask broadcasts)
    temb = embed_scalar(p, "t_embedder", sigmas, cfg["freq_dim"])       # [R, D]
    t0 = linear(silu(temb), p["t_block.1.weight"], p["t_block.1.bias"])  # [R, 6D]
    femb = embed_scalar(p, "flow_embedder", flow_score.astype(np.float32), cfg["freq_dim"])
    f0 = linear(silu(femb), p["flow_block.1.weight"], p["flow_block.1.bias"])   # [B, 6D]
    mod = t0[None] + f0[:, None]                              # [B, R, 6D]
    return temb, mod, index


def patch_embed(p: Params, x: np.ndarray) -> np.ndarray:
    """Latent [B, C, T, H, W] -> tokens [B, N, D] (a 1x1 conv = per-voxel linear map)."""
    B, C = x.shape[:2]
    tokens = x.reshape(B, C, -1).transpose(0, 2, 1)           # [B, N, C], frame-major
    return linear(tokens, p["x_embedder.proj.weight"], p["x_embedder.proj.bias"])


def final_layer(p: Params, h: np.ndarray, temb: np.ndarray, index: np.ndarray,
                cfg: Mapping) -> np.ndarray:
    """adaLN with the timestep embedding only, then Linear D -> C_out.  [B,N,D] -> [B,N,C_out]"""
    table = p["final_layer.scale_shift_table"]                # [2, D]
    B = h.shape[0]
    shift = np.broadcast_to(table[0] + temb, (B,) + temb.shape)   # [B, R, D]
    scale = np.broadcast_to(table[1] + temb, (B,) + temb.shape)
    o = ops.layernorm_modulate(h, shift, scale, index, cfg["norm_eps"])
    return linear(o, p["final_layer.linear.weight"], p["final_layer.linear.bias"])


def forward(p: Params, cfg: Mapping, x: np.ndarray, timestep: np.ndarray, cond_mask: np.ndarray,
            flow_score: np.ndarray) -> np.ndarray:
    """Velocity v [B, C, T, H, W] for the latent x [B, C, T, H, W] (§4).

    timestep [B] on the 0..1000 scale; cond_mask [B or 1, N], 1.0 on guide tokens;
    flow_score [B] (raw motion score).
    """
    B, C, T, H, W = x.shape
    rope = rope_tables(T, H, W, cfg["head_dim"], cfg["rope_scales"], cfg["rope_theta"])
    temb, mod, index = conditioning(p, timestep, cond_mask, flow_score, cfg)
    h = patch_embed(p, x.astype(np.float32))                  # [B, N, D]
    for i in range(cfg["num_blocks"]):
        block(p, i, h, mod, index, rope, (T, H, W), cfg)
    out = final_layer(p, h, temb, index, cfg)                 # [B, N, C_out]
    return np.ascontiguousarray(out.transpose(0, 2, 1)).reshape(B, -1, T, H, W)


# ----------------------------------------------------------------------------- loading

class Denoiser:
    """`f(x, timestep, cond_mask, flow_score) -> v` over a weights mapping and its config."""

    def __init__(self, params: Params, config: Mapping):
        self.params, self.config = params, config

    def __call__(self, x: np.ndarray, timestep: np.ndarray, cond_mask: np.ndarray,
                 flow_score: np.ndarray) -> np.ndarray:
        x, timestep = np.asarray(x, np.float32), np.asarray(timestep, np.float32)
        cond_mask, flow_score = np.asarray(cond_mask, np.float32), np.asarray(flow_score, np.float32)
        check_inputs(self.config, x, timestep, cond_mask, flow_score)
        return forward(self.params, self.config, x, timestep, cond_mask, flow_score)


def check_inputs(cfg: Mapping, x, timestep, cond_mask, flow_score) -> None:
    """Shape rules of the denoiser call, each stated with the offending value."""
    if x.ndim != 5 or x.shape[1] != cfg["in_channels"]:
        raise TinyI2VError(f"x must be [B, {cfg['in_channels']}, T, H, W], got {list(x.shape)}")
    B, N = x.shape[0], int(np.prod(x.shape[2:]))
    if timestep.shape != (B,) or flow_score.shape != (B,):
        raise TinyI2VError(f"timestep and flow_score must be [{B}], got "
                           f"{list(timestep.shape)} and {list(flow_score.shape)}")
    if cond_mask.ndim != 2 or cond_mask.shape[0] not in (1, B) or cond_mask.shape[1] != N:
        raise TinyI2VError(f"cond_mask must be [{B} or 1, {N}] (N = T*H*W), "
                           f"got {list(cond_mask.shape)}")


def load_denoiser(path, use_mmap: bool | None = None) -> Denoiser:
    """Open a transformer component folder (or a model folder's `transformer/`)."""
    comp = Component(component_dir(path, "transformer"), use_mmap=use_mmap)
    if comp.config.get("_class_name") != CLASS_NAME:
        raise FormatError(f"{comp.path}: not a {CLASS_NAME} config "
                          f"(_class_name {comp.config.get('_class_name')!r:.80})")
    reference = official_config()
    check_config(comp.config, reference, str(comp.path), required=reference)
    check_tensors(comp.shapes(), param_shapes(comp.config), str(comp.path))
    return Denoiser(comp, comp.config)
