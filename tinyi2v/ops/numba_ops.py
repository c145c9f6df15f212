"""numba kernels: the same functions as `numpy_ops.py`, written as explicit loops.

Imported only when the numba backend is selected (numba is optional: `pip install tinyi2v[fast]`).
The loops fuse what numpy does in several passes (normalise + modulate, rotate + ReLU,
bias + SiLU) so each activation is read and written once, and run in parallel over rows.
Matrix products stay in numpy, where BLAS already runs them near peak (linear attention too:
its kernel only fuses the elementwise work around two GEMMs).
The compiled kernels are cached in $XDG_CACHE_HOME/tinyi2v/numba (default ~/.cache/tinyi2v/numba;
NUMBA_CACHE_DIR overrides it), never beside this file.
"""
from __future__ import annotations

import math
import os
import tempfile

import numba
import numpy as np
from numba import prange

from .blas import split_run

# numba's OpenMP threads spin-wait between parallel loops and fight BLAS's threads for the cores:
# on 2 cores that made a small forward 40x slower. The workqueue layer sleeps instead.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Not numba's default __pycache__ beside this file: pip uninstall leaves it, and the leftover
# tinyi2v/ops/ then shadows an editable install as a namespace package. No writable folder: no cache.
_CACHE = bool(numba.config.CACHE_DIR)                        # NUMBA_CACHE_DIR: the user's choice
if not _CACHE:
    _home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    _dir = os.path.join(_home, "tinyi2v", "numba")
    try:
        if os.path.isabs(_dir):                              # not "~" left unexpanded
            os.makedirs(_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=_dir).close()
            numba.config.CACHE_DIR, _CACHE = _dir, True
    except OSError:
        pass

# Allow reassociation so reductions vectorise; keep NaN/inf semantics (no nnan/ninf).
_FLAGS = {"parallel": True, "fastmath": {"contract", "reassoc", "nsz", "arcp"}}


def _jit(fn):
    """Compile once and keep the machine code in the cache folder chosen above. Without one (no
    writable home, or NUMBA_CACHE_DIR unwritable and no other folder numba can use, where
    cache=True raises), compile on each run instead."""
    try:
        return numba.njit(cache=_CACHE, **_FLAGS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
        return numba.njit(**_FLAGS)(fn)


@_jit
def _half_to_float(h, out):
    for i in prange(h.size):
        x = np.uint32(h[i])
        em = x & np.uint32(0x7FFF)                            # exponent and mantissa
        if em >= 0x7C00:                                      # inf, NaN: exponent all ones
            bits = (em << np.uint32(13)) | np.uint32(0x7F800000)
        elif em >= 0x0400:                                    # normal: re-bias the exponent
            bits = (em << np.uint32(13)) + np.uint32(0x38000000)
        else:                                                 # zero, subnormal: em * 2^-24
            bits = np.float32(np.float32(em) * np.float32(2.0 ** -24)).view(np.uint32)
        out[i] = bits | ((x & np.uint32(0x8000)) << np.uint32(16))


def to_float32(a):
    if a.dtype != np.float16:
        return a.astype(np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    _half_to_float(np.ascontiguousarray(a).reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32))
    return out


@_jit
def _layernorm_modulate(x, shift, scale, index, eps, out):
    B, N, C = x.shape
    for bn in prange(B * N):
        b, n = bn // N, bn % N
        r = index[b, n]
        mean = 0.0
        for c in range(C):
            mean += x[b, n, c]
        mean /= C
        var = 0.0
        for c in range(C):
            d = x[b, n, c] - mean
            var += d * d
        inv = 1.0 / math.sqrt(var / C + eps)
        for c in range(C):
            out[b, n, c] = (x[b, n, c] - mean) * inv * (1.0 + scale[b, r, c]) + shift[b, r, c]


def layernorm_modulate(x, shift, scale, index, eps=1e-6):
    out = np.empty_like(x)
    _layernorm_modulate(x, _contiguous(shift), _contiguous(scale), index, np.float32(eps), out)
    return out


def _contiguous(table):
    """A [B, R, C] per-row table as a C-contiguous array (callers pass strided views and
    broadcasts): numba vectorises loops over C-contiguous arrays only. A few KB to copy, and
    LayerNorm + modulation 3x, the gated add 2x faster on 720p shapes."""
    return np.ascontiguousarray(table, dtype=np.float32)


def gated_add_(h, y, gate, index):
    _gated_add(h, y, _contiguous(gate), index)


@_jit
def _gated_add(h, y, gate, index):
    B, N, C = h.shape
    for bn in prange(B * N):
        b, n = bn // N, bn % N
        r = index[b, n]
        for c in range(C):
            h[b, n, c] += gate[b, r, c] * y[b, n, c]


@_jit
def _rope3d(x, cos, sin, relu, out):
    B, N, nh, _ = x.shape
    K = cos.shape[2]
    for bn in prange(B * N):
        b, n = bn // N, bn % N
        for hd in range(nh):
            for a in range(3):
                base = a * 2 * K
                for j in range(K):
                    x1 = x[b, n, hd, base + j]
                    x2 = x[b, n, hd, base + K + j]
                    c = cos[n, a, j]
                    s = sin[n, a, j]
                    y1 = x1 * c - x2 * s
                    y2 = x2 * c + x1 * s
                    if relu:
                        y1 = max(y1, 0.0)
                        y2 = max(y2, 0.0)
                    out[b, n, hd, base + j] = y1
                    out[b, n, hd, base + K + j] = y2


@_jit
def _qk_norm_rope(qkv, gains, eps, cos, sin, out):
    B, N, _, nh, D = qkv.shape
    K = cos.shape[2]
    for bns in prange(B * N * 2):                            # (token, q or k)
        b, n, s = bns // (2 * N), bns // 2 % N, bns % 2
        ms = 0.0
        for hd in range(nh):
            for d in range(D):
                ms += qkv[b, n, s, hd, d] * qkv[b, n, s, hd, d]
        inv = 1.0 / math.sqrt(ms / (nh * D) + eps)
        for hd in range(nh):
            for a in range(3):
                base = a * 2 * K
                for j in range(K):
                    x1 = qkv[b, n, s, hd, base + j] * inv * gains[s, hd * D + base + j]
                    x2 = qkv[b, n, s, hd, base + K + j] * inv * gains[s, hd * D + base + K + j]
                    c = cos[n, a, j]
                    si = sin[n, a, j]
                    out[s, b, n, hd, base + j] = max(x1 * c - x2 * si, 0.0)
                    out[s, b, n, hd, base + K + j] = max(x2 * c + x1 * si, 0.0)


def qk_norm_rope(qkv, q_gain, k_gain, eps, cos, sin):
    # Reads the whole fused qkv (C-contiguous) rather than q and k as views of it: numba
    # vectorises loops over C-contiguous arrays only, and on the strided views this kernel
    # took 2x as long (5.3 against 2.6 ms per 720p call).
    out = np.empty((2,) + qkv.shape[:2] + qkv.shape[3:], dtype=np.float32)   # [2, B, N, heads, D]
    _qk_norm_rope(np.ascontiguousarray(qkv), np.stack([q_gain, k_gain]), np.float32(eps),
                  cos, sin, out)
    return out[0], out[1]


def rope3d(x, cos, sin, relu=False):
    out = np.empty(x.shape, dtype=x.dtype)
    _rope3d(x, cos, sin, relu, out)
    return out


@_jit
def _linear_attention_normalise(q, k, num, eps, out):
    B, N, nh, D = q.shape
    for bh in prange(B * nh):
        b, hd = bh // nh, bh % nh
        z = np.zeros(D, dtype=np.float32)                     # sum_m k_m
        for m in range(N):
            for d in range(D):
                z[d] += k[b, m, hd, d]
        for n in range(N):
            den = 0.0
            for d in range(D):
                den += q[b, n, hd, d] * z[d]
            inv = 1.0 / (den + eps)
            for e in range(D):                                # back to [B, N, heads, D]
                out[b, n, hd, e] = num[b, hd, n, e] * inv


def linear_attention(q, k, v, eps):
    # The two products are GEMMs (BLAS, 4x faster than loops here), per head and the heads
    # shared out over threads (blas.py: 1.5x faster than numpy's batched matmul on 2 cores);
    # the kernel fuses the normaliser sum_m k_m, the per-query denominator, the division and
    # the transpose back.
    B, N, nh, D = q.shape
    num = np.empty((B, nh, N, D), dtype=np.float32)

    def heads(share):
        for b, h in (divmod(j, nh) for j in share):
            kv = k[b, :, h].T @ v[b, :, h]                    # [D, N] @ [N, D] -> [D, D]
            np.matmul(q[b, :, h], kv, out=num[b, h])          # [N, D] @ [D, D]

    split_run(heads, B * nh)
    out = np.empty(q.shape, dtype=np.float32)
    _linear_attention_normalise(q, k, num, np.float32(eps), out)
    return out


@_jit
def _depthwise_silu_gate(x, weight, bias, out):
    F, H, W, C = x.shape
    half = C // 2
    for fh in prange(F * H):
        f, i = fh // H, fh % H
        acc = np.empty(C, dtype=np.float32)
        for j in range(W):
            if 0 < i < H - 1 and 0 < j < W - 1:              # inside: nine taps, in registers
                for c in range(half):                         # contiguous: vectorises
                    a, g = bias[c], bias[half + c]
                    for di in range(3):
                        for dj in range(3):
                            a += x[f, i + di - 1, j + dj - 1, c] * weight[di, dj, c]
                            g += x[f, i + di - 1, j + dj - 1, half + c] * weight[di, dj, half + c]
                    out[f, i, j, c] = a * g * _sigmoid(g)
                continue
            for c in range(C):                                # on the border: the taps that
                acc[c] = bias[c]                              # fall inside the frame, summed
            for di in range(max(0, 1 - i), min(3, H + 1 - i)):          # in the same order
                for dj in range(max(0, 1 - j), min(3, W + 1 - j)):
                    for c in range(C):
                        acc[c] += x[f, i + di - 1, j + dj - 1, c] * weight[di, dj, c]
            for c in range(half):
                g = acc[half + c]
                out[f, i, j, c] = acc[c] * g * _sigmoid(g)


def depthwise_silu_gate(x, weight, bias):
    # Fused so the [F, H, W, 2C] convolution output never goes to memory: at the official
    # size it is 64 MB per block, written and read back once each by the unfused pair.
    out = np.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=np.float32)
    _depthwise_silu_gate(x, np.ascontiguousarray(weight.transpose(1, 2, 0)), bias, out)   # [3, 3, C]
    return out


_TANH_CLAMP = np.float32(7.90531110763549805)


@numba.njit(inline="always", fastmath=True)
def _sigmoid(u):
    """1 / (1 + exp(-u)) as 0.5 + 0.5 tanh(u / 2), with tanh a [13/6] rational approximation
    (max abs error 3.5e-7): plain float32 arithmetic that vectorises, where numba's exp is a
    scalar call (and a float64 constant would make the whole polynomial float64, 1.6x slower).
    Beyond |u/2| = 7.9 the sigmoid is within 1.4e-7 of 0 or 1, so silu(u) = u * sigmoid(u) stays
    within 2.3e-6 of exact everywhere (measured over a dense float32 sweep of [-40, 40])."""
    t = min(max(np.float32(0.5) * u, -_TANH_CLAMP), _TANH_CLAMP)
    t2 = t * t
    p = ((((((np.float32(-2.76076847742355e-16) * t2 + np.float32(2.00018790482477e-13)) * t2
             - np.float32(8.60467152213735e-11)) * t2 + np.float32(5.12229709037114e-08)) * t2
           + np.float32(1.48572235717979e-05)) * t2 + np.float32(6.37261928875436e-04)) * t2
         + np.float32(4.89352455891786e-03)) * t
    q = ((np.float32(1.19825839466702e-06) * t2 + np.float32(1.18534705686654e-04)) * t2
         + np.float32(2.26843463243900e-03)) * t2 + np.float32(4.89352518554385e-03)
    s = np.float32(0.5) + np.float32(0.5) * (p / q)
    if t == -_TANH_CLAMP:                                     # selects, not branches: still SIMD
        s = np.float32(0.0)
    if t == _TANH_CLAMP:
        s = np.float32(1.0)
    return s


@_jit
def _bias_silu(x, bias):
    R, C = x.shape
    for r in prange(R):
        for c in range(C):
            u = x[r, c] + bias[c]
            x[r, c] = u * _sigmoid(u)


def bias_silu_(x, bias):
    assert x.flags.c_contiguous, "in-place kernel needs a contiguous array"
    _bias_silu(x.reshape(-1, x.shape[-1]), bias)


@_jit
def _pixel_norm(x, eps, silu, out):
    R, C = x.shape
    for r in prange(R):
        ms = 0.0
        for c in range(C):
            ms += x[r, c] * x[r, c]
        inv = 1.0 / math.sqrt(ms / C + eps)
        if silu:
            for c in range(C):
                y = x[r, c] * inv
                out[r, c] = y * _sigmoid(y)
        else:
            for c in range(C):
                out[r, c] = x[r, c] * inv


def pixel_norm(x, eps, silu):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _pixel_norm(x.reshape(-1, x.shape[-1]), np.float32(eps), silu, out.reshape(-1, x.shape[-1]))
    return out


@numba.njit(inline="always")
def _bt(d0, d1, d2, d3):                                      # B^T applied to 4 values
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@numba.njit(inline="always")
def _at(m0, m1, m2, m3):                                      # A^T applied to 4 values
    return m0 + m1 + m2, m1 - m2 - m3


@numba.njit(inline="always")
def _put4(out, e, i, j, slot, c, v):                          # out[e .. e + 3, i, j, slot, c] = v
    out[e, i, j, slot, c] = v[0]
    out[e + 1, i, j, slot, c] = v[1]
    out[e + 2, i, j, slot, c] = v[2]
    out[e + 3, i, j, slot, c] = v[3]


@_jit
def _winograd_tiles(p, row0, out, slot):
    _, nr, tx, _, C = out.shape
    for i in prange(nr):
        y = 2 * (row0 + i)
        for j in range(tx):
            x = 2 * j
            for c in range(C):                                # contiguous: vectorises
                a0, a1, a2, a3 = _bt(p[y, x, c], p[y + 1, x, c], p[y + 2, x, c], p[y + 3, x, c])
                b0, b1, b2, b3 = _bt(p[y, x + 1, c], p[y + 1, x + 1, c], p[y + 2, x + 1, c],
                                     p[y + 3, x + 1, c])
                c0, c1, c2, c3 = _bt(p[y, x + 2, c], p[y + 1, x + 2, c], p[y + 2, x + 2, c],
                                     p[y + 3, x + 2, c])
                d0, d1, d2, d3 = _bt(p[y, x + 3, c], p[y + 1, x + 3, c], p[y + 2, x + 3, c],
                                     p[y + 3, x + 3, c])
                _put4(out, 0, i, j, slot, c, _bt(a0, b0, c0, d0))   # elements 4a + b
                _put4(out, 4, i, j, slot, c, _bt(a1, b1, c1, d1))
                _put4(out, 8, i, j, slot, c, _bt(a2, b2, c2, d2))
                _put4(out, 12, i, j, slot, c, _bt(a3, b3, c3, d3))


def winograd_tiles(padded, row0, out, slot):
    _winograd_tiles(np.ascontiguousarray(padded), row0, out, slot)


@_jit
def _winograd_untile(m, bias, out):
    _, nr, tx, C = m.shape
    for i in prange(nr):
        for j in range(tx):
            for c in range(C):
                a0, a1 = _at(m[0, i, j, c], m[4, i, j, c], m[8, i, j, c], m[12, i, j, c])
                b0, b1 = _at(m[1, i, j, c], m[5, i, j, c], m[9, i, j, c], m[13, i, j, c])
                c0, c1 = _at(m[2, i, j, c], m[6, i, j, c], m[10, i, j, c], m[14, i, j, c])
                d0, d1 = _at(m[3, i, j, c], m[7, i, j, c], m[11, i, j, c], m[15, i, j, c])
                y00, y01 = _at(a0, b0, c0, d0)
                y10, y11 = _at(a1, b1, c1, d1)
                out[2 * i, 2 * j, c] = y00 + bias[c]
                out[2 * i, 2 * j + 1, c] = y01 + bias[c]
                out[2 * i + 1, 2 * j, c] = y10 + bias[c]
                out[2 * i + 1, 2 * j + 1, c] = y11 + bias[c]


def winograd_untile(m, bias, out):
    assert out.flags.c_contiguous, "the output rows must be one contiguous block"
    _winograd_untile(m, bias, out)
