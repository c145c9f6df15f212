"""Reference kernels in vectorised numpy: the backend that runs everywhere (Pyodide included).

Every function here has a twin in `numba_ops.py` with the same signature and result (within
float32 round-off); the tests compare the two on random shapes. Layouts are channel-last,
as the denoiser keeps tokens: x[b, n, c] with n = t*H*W + h*W + w.

Per-token modulation is passed as a few distinct rows plus an index: `rows[b, r, c]` and
`index[b, n] = r`. A MobileI2V sample has only two distinct timestep rows (guide frame at
t=0, the rest at t), so this is exact and avoids materialising [B, N, C] tables.
"""
from __future__ import annotations

import numpy as np


def _per_token(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[B, R, C] rows gathered by [B, N] index -> [B, N, C]."""
    return rows[np.arange(rows.shape[0])[:, None], index]


def to_float32(a: np.ndarray) -> np.ndarray:
    """Any float array (FP16 weights as stored) -> a new float32 array, exact."""
    return a.astype(np.float32)


def layernorm_modulate(x: np.ndarray, shift: np.ndarray, scale: np.ndarray, index: np.ndarray,
                       eps: float = 1e-6) -> np.ndarray:
    """LayerNorm without affine over the last axis, then `* (1 + scale) + shift` per token.

    x [B, N, C]; shift, scale [B, R, C]; index [B, N] -> [B, N, C] (a new array).
    """
    mean = x.mean(axis=-1, keepdims=True)                     # [B, N, 1]
    y = x - mean                                              # [B, N, C]
    var = np.mean(y * y, axis=-1, keepdims=True)              # [B, N, 1]
    y *= 1.0 / np.sqrt(var + np.float32(eps))
    y *= 1.0 + _per_token(scale, index)
    y += _per_token(shift, index)
    return y


def gated_add_(h: np.ndarray, y: np.ndarray, gate: np.ndarray, index: np.ndarray) -> None:
    """Residual update in place: h += gate[token] * y.   h, y [B, N, C]; gate [B, R, C]."""
    h += _per_token(gate, index) * y


def rope3d(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, relu: bool = False) -> np.ndarray:
    """3D rotary embedding, "rotate half" within each of the three axis chunks of a head.

    x [B, N, heads, D] with D = 3 * 2 * K (chunks t, h, w; each split in halves x1 | x2);
    cos, sin [N, 3, K] -> [B, N, heads, D]:  x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin.
    `relu=True` applies the linear-attention feature map afterwards (RoPE first, ReLU second).
    """
    B, N, nh, D = x.shape
    K = cos.shape[-1]
    xs = x.reshape(B, N, nh, 3, 2, K)                         # [B, N, heads, axis, half, K]
    c = cos[None, :, None]                                    # [1, N, 1, 3, K]
    s = sin[None, :, None]
    out = np.empty_like(xs)
    out[..., 0, :] = xs[..., 0, :] * c - xs[..., 1, :] * s
    out[..., 1, :] = xs[..., 1, :] * c + xs[..., 0, :] * s
    if relu:
        np.maximum(out, 0, out=out)
    return out.reshape(B, N, nh, D)


def qk_norm_rope(qkv: np.ndarray, q_gain: np.ndarray, k_gain: np.ndarray, eps: float,
                 cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The linear-attention query/key path, for q and k of the fused projection: RMSNorm over
    all heads of a token (x / sqrt(mean(x^2) + eps) * gain, before the head split upstream),
    then `rope3d`, then ReLU.

    qkv [B, N, 3, heads, D] (q, k, v); gains [heads * D]; cos, sin [N, 3, K]
    -> q, k [B, N, heads, D], >= 0.
    """
    B, N, _, nh, D = qkv.shape

    def norm_rope(x: np.ndarray, gain: np.ndarray) -> np.ndarray:   # [B, N, heads, D]
        flat = x.reshape(B, N, nh * D)
        y = flat * (1.0 / np.sqrt(np.mean(flat * flat, axis=-1, keepdims=True) + np.float32(eps)))
        y *= gain
        return rope3d(y.reshape(B, N, nh, D), cos, sin, relu=True)

    return norm_rope(qkv[:, :, 0], q_gain), norm_rope(qkv[:, :, 1], k_gain)


def linear_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Linear attention over already feature-mapped q, k (non-negative).

    q, k, v [B, N, heads, D] -> [B, N, heads, D]:
    out_n = q_n . (K^T V) / (q_n . sum_m k_m + eps), the O(N D^2) order of softmax-free attention.
    """
    qh = q.transpose(0, 2, 1, 3)                              # [B, heads, N, D]
    kh = k.transpose(0, 2, 1, 3)
    vh = v.transpose(0, 2, 1, 3)
    kv = kh.transpose(0, 1, 3, 2) @ vh                        # [B, heads, D, D]
    z = kh.sum(axis=2)                                        # [B, heads, D]
    num = qh @ kv                                             # [B, heads, N, D]
    den = qh @ z[..., None]                                   # [B, heads, N, 1]
    return (num / (den + np.float32(eps))).transpose(0, 2, 1, 3)


def depthwise_silu_gate(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """GLUMBConv's middle: depthwise 3x3 convolution (stride 1, zero padding 1, channel-last),
    then a GLU with a SiLU gate: the first half of the channels times silu(the second half).

    x [F, H, W, 2C] (F = frames), weight [2C, 3, 3], bias [2C] -> [F, H, W, C].
    Accumulates the nine shifted taps two output rows at a time and gates them there, so the
    partial sums and the gate's temporaries stay in cache (2x faster than whole-tensor passes
    at 5760 channels); never builds an im2col matrix or the [F, H, W, 2C] convolution output.
    """
    F, H, W, C = x.shape
    half = C // 2
    xp = np.zeros((F, H + 2, W + 2, C), dtype=x.dtype)
    xp[:, 1:-1, 1:-1] = x
    taps = np.ascontiguousarray(weight.transpose(1, 2, 0))    # [3, 3, 2C]
    out = np.empty((F, H, W, half), dtype=x.dtype)
    acc, tmp = np.empty((2, W, C), dtype=x.dtype), np.empty((2, W, C), dtype=x.dtype)
    for f in range(F):
        for r in range(0, H, 2):
            a, t = acc[:min(2, H - r)], tmp[:min(2, H - r)]  # [rows, W, 2C]
            a[...] = bias
            for i in range(3):
                for j in range(3):
                    np.multiply(xp[f, r + i:r + i + len(t), j:j + W], taps[i, j], out=t)
                    a += t
            value, gate, g = a[..., :half], a[..., half:], t[..., :half]
            np.negative(gate, out=g)
            with np.errstate(over="ignore"):                  # exp(-gate) -> inf gives 0
                np.exp(g, out=g)
            g += 1
            o = out[f, r:r + len(t)]
            np.divide(value, g, out=o)
            o *= gate
    return out


def bias_silu_(x: np.ndarray, bias: np.ndarray, chunk: int = 2**16) -> None:
    """In place: x = silu(x + bias), silu(u) = u * sigmoid(u).   x [..., C] (contiguous); bias [C].

    In blocks of about `chunk` values, so the temporaries stay in cache."""
    assert x.flags.c_contiguous, "in-place kernel needs a contiguous array"
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, chunk // max(rows.shape[1], 1))
    tmp = np.empty((min(step, len(rows)), rows.shape[1]), dtype=x.dtype)
    for r in range(0, len(rows), step):
        u, t = rows[r:r + step], tmp[:len(rows[r:r + step])]
        u += bias
        np.negative(u, out=t)
        with np.errstate(over="ignore"):                      # exp(-u) -> inf gives silu -> 0
            np.exp(t, out=t)
        t += 1
        u /= t


def pixel_norm(x: np.ndarray, eps: float, silu: bool) -> np.ndarray:
    """RMS norm over the last axis without weight (the VAEs' "pixel norm"), optionally SiLU after.

    x [..., C] -> [..., C] (a new array): y = x / sqrt(mean(x^2) + eps); silu(y) = y * sigmoid(y).
    """
    y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))
    if silu:
        with np.errstate(over="ignore"):
            y /= 1.0 + np.exp(-y)
    return y


# Winograd F(2x2, 3x3) (Lavin & Gray 2015): a 2x2 block of a 3x3 convolution's output from a 4x4
# input tile with 16 multiplications per channel pair instead of 36. The input tile d becomes
# B^T d B, the taps g become G g G^T (vae/layers.py), their elementwise products summed over
# input channels are 16 GEMMs, and A^T m A turns the 16 sums back into the 2x2 outputs:
#     B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]     A^T = [[1, 1, 1, 0],
#                                                                                   [0, 1, -1, -1]]

def winograd_tiles(padded: np.ndarray, row0: int, out: np.ndarray, slot: int) -> None:
    """Input transform B^T d B of the tile rows row0 .. row0 + nr of a zero-padded frame.

    padded [Hp, Wp, C] (tile (i, j) reads rows 2i .. 2i + 3, columns 2j .. 2j + 3);
    out [16, nr, tx, slots, C]: element 4a + b of tile (row0 + i, j) goes to
    out[4a + b, i, j, slot]; the other slots are left as they are.
    """
    _, nr, tx, _, _ = out.shape
    d = [padded[2 * row0 + k:2 * (row0 + nr) + k:2] for k in range(4)]   # tile row k: [nr, Wp, C]
    for a, r in enumerate((d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])):   # B^T d
        c = [r[:, k:k + 2 * tx:2] for k in range(4)]                       # tile column k
        np.subtract(c[0], c[2], out=out[4 * a + 0, :, :, slot])            # (B^T d) B
        np.add(c[1], c[2], out=out[4 * a + 1, :, :, slot])
        np.subtract(c[2], c[1], out=out[4 * a + 2, :, :, slot])
        np.subtract(c[1], c[3], out=out[4 * a + 3, :, :, slot])


def winograd_untile(m: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """Output transform A^T m A plus bias: m [16, nr, tx, Cout] (element 4a + b) -> out
    [2 nr, 2 tx, Cout], output pixel (2i + y, 2j + x) from tile (i, j)."""
    _, nr, tx, cout = m.shape
    m = m.reshape(4, 4, nr, tx, cout)
    o = out.reshape(nr, 2, tx, 2, cout)                       # [i, y, j, x, Cout]
    for y, r in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):      # A^T m: [4, nr, tx, Cout]
        np.add(r[0] + r[1], r[2], out=o[:, y, :, 0])                       # (A^T m) A
        np.subtract(r[1] - r[2], r[3], out=o[:, y, :, 1])
    out += bias
