"""Every numba kernel against its separately written numpy twin, over random shapes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from tinyi2v.ops import numpy_ops as ref

numba_ops = pytest.importorskip("tinyi2v.ops.numba_ops", exc_type=ImportError)

TOL = dict(rtol=2e-5, atol=2e-5)
dims = st.integers(1, 7)
fast = settings(max_examples=25, deadline=None)


def arrays(seed, *shapes, low=-3.0, high=3.0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(low, high, s).astype(np.float32) for s in shapes]


@fast
@given(B=st.integers(1, 3), N=dims, C=st.integers(1, 40), R=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_layernorm_modulate(B, N, C, R, seed):
    x, shift, scale = arrays(seed, (B, N, C), (B, R, C), (B, R, C))
    index = np.random.default_rng(seed).integers(0, R, (B, N))
    np.testing.assert_allclose(numba_ops.layernorm_modulate(x, shift, scale, index),
                               ref.layernorm_modulate(x, shift, scale, index), **TOL)


@fast
@given(B=st.integers(1, 3), N=dims, C=st.integers(1, 40), R=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_gated_add(B, N, C, R, seed):
    h, y, gate = arrays(seed, (B, N, C), (B, N, C), (B, R, C))
    index = np.random.default_rng(seed).integers(0, R, (B, N))
    h1, h2 = h.copy(), h.copy()
    numba_ops.gated_add_(h1, y, gate, index)
    ref.gated_add_(h2, y, gate, index)
    np.testing.assert_allclose(h1, h2, **TOL)


@fast
@given(B=st.integers(1, 2), N=dims, heads=st.integers(1, 3), K=st.integers(1, 12),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_rope3d(B, N, heads, K, relu, seed):
    x, angles = arrays(seed, (B, N, heads, 6 * K), (N, 3, K), low=-10, high=10)
    cos, sin = np.cos(angles), np.sin(angles)
    np.testing.assert_allclose(numba_ops.rope3d(x, cos, sin, relu), ref.rope3d(x, cos, sin, relu), **TOL)


@fast
@given(B=st.integers(1, 2), N=dims, heads=st.integers(1, 3), D=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_linear_attention(B, N, heads, D, seed):
    q, k, v = arrays(seed, (B, N, heads, D), (B, N, heads, D), (B, N, heads, D))
    q, k = np.maximum(q, 0), np.maximum(k, 0)        # the op receives ReLU features
    np.testing.assert_allclose(numba_ops.linear_attention(q, k, v, 1e-8),
                               ref.linear_attention(q, k, v, 1e-8), rtol=1e-4, atol=1e-4)


@fast
@given(B=st.integers(1, 2), N=dims, heads=st.integers(1, 3), K=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_qk_norm_rope(B, N, heads, K, seed):
    D = 6 * K
    qkv, gq, gk, cos, sin = arrays(seed, (B, N, 3, heads, D), (heads * D,), (heads * D,),
                                   (N, 3, K), (N, 3, K))
    for got, expect in zip(numba_ops.qk_norm_rope(qkv, gq, gk, 1e-5, cos, sin),
                           ref.qk_norm_rope(qkv, gq, gk, 1e-5, cos, sin), strict=True):
        np.testing.assert_allclose(got, expect, **TOL)


def test_qk_norm_rope_normalises_over_all_heads():
    """The numpy twin against its definition: one RMS over the token's heads * D values, q and
    k each with their own gain; v (slot 2) is not read."""
    qkv, gq, gk, cos, sin = arrays(3, (1, 2, 3, 2, 6), (12,), (12,), (2, 3, 1), (2, 3, 1))
    qkv[:, :, 2] = np.nan
    for slot, gain, got in zip((0, 1), (gq, gk), ref.qk_norm_rope(qkv, gq, gk, 1e-5, cos, sin),
                               strict=True):
        flat = qkv[:, :, slot].reshape(1, 2, 12)
        normed = flat / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-5) * gain
        expect = ref.rope3d(normed.reshape(1, 2, 2, 6), cos, sin, relu=True)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def direct_depthwise(x, w, b):
    """Zero-padded depthwise 3x3 convolution as the plain sum: x [F, H, W, C], w [C, 3, 3]."""
    _, H, W, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return b + sum(xp[:, i:i + H, j:j + W] * w[:, i, j] for i in range(3) for j in range(3))


@fast
@given(F=st.integers(1, 3), H=dims, W=dims, C=st.integers(1, 20), seed=st.integers(0, 2**16))
@example(F=3, H=4, W=2, C=4, seed=65535)   # taps that cancel: a bound in |value| alone fails here
def test_depthwise_silu_gate(F, H, W, C, seed):
    """Both kernels against the float64 definition, value * silu(gate). A float32 sum of the nine
    taps and the bias is off by at most ~10 eps times the sum of their magnitudes (not of their
    sum, which can cancel); that error enters through silu(gate) and, for the gate, through
    silu' (|silu'| < 1.1). numba's SiLU adds up to 2.3e-6 * |value| (see numba_ops._sigmoid)."""
    x, w, b = arrays(seed, (F, H, W, 2 * C), (2 * C, 3, 3), (2 * C,))
    conv = direct_depthwise(x, w, b)                                       # [F, H, W, 2C] float64
    size = direct_depthwise(np.abs(x), np.abs(w), np.abs(b))               # sum of |terms|
    value, gate = conv[..., :C], conv[..., C:]
    silu = gate / (1 + np.exp(-gate))
    expect = value * silu
    gamma = 10 * np.finfo(np.float32).eps
    bound = (gamma * (np.abs(silu) * size[..., :C] + 1.1 * np.abs(value) * size[..., C:])
             + 2.5e-6 * np.abs(value) + 1e-6 * np.abs(expect) + 1e-7)
    for kernel in (ref.depthwise_silu_gate, numba_ops.depthwise_silu_gate):
        err = np.abs(kernel(x, w, b) - expect)
        assert np.all(err <= bound), (kernel.__module__, (err / bound).max())


@fast
@given(R=dims, C=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_bias_silu(R, C, seed):
    x, b = arrays(seed, (R, 3, C), (C,), low=-100, high=100)   # large |x|: exp overflow path
    x1, x2 = x.copy(), x.copy()
    numba_ops.bias_silu_(x1, b)
    ref.bias_silu_(x2, b)
    np.testing.assert_allclose(x1, x2, **TOL)


def test_numpy_depthwise_silu_gate_matches_its_definition():
    """The numpy kernel itself: the direct convolution sum, then value * silu(gate), in float64;
    5 rows (an odd last row block), and gates far into both tails (exp overflow: silu -> 0)."""
    x, w, b = arrays(1, (2, 5, 4, 6), (6, 3, 3), (6,))
    b[3:] = [-1000.0, 0.0, 1000.0]                    # gate channels: -inf tail, 0, +inf tail
    conv = direct_depthwise(x, w, b)
    gate = conv[..., 3:]
    expect = conv[..., :3] * gate / (1 + np.exp(-np.clip(gate, -700, 700)))
    np.testing.assert_allclose(ref.depthwise_silu_gate(x, w, b), expect, rtol=1e-5, atol=1e-4)


@fast
@given(R=dims, C=st.integers(1, 40), silu=st.booleans(), seed=st.integers(0, 2**16))
def test_pixel_norm(R, C, silu, seed):
    (x,) = arrays(seed, (R, 2, C), low=-100, high=100)
    x[0, 0] = 0.0                                     # an all-zero pixel: eps keeps it finite
    np.testing.assert_allclose(numba_ops.pixel_norm(x, 1e-8, silu),
                               ref.pixel_norm(x, 1e-8, silu), **TOL)


def test_pixel_norm_matches_definition():
    """The numpy kernel itself: x / sqrt(mean(x^2) + eps), then SiLU, in float64."""
    (x,) = arrays(2, (3, 5, 7))
    y = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-8)
    np.testing.assert_allclose(ref.pixel_norm(x, 1e-8, False), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.pixel_norm(x, 1e-8, True), y / (1 + np.exp(-y)),
                               rtol=1e-5, atol=1e-6)


def test_to_float32_is_exact_for_every_fp16_value():
    h = np.arange(65536, dtype=np.uint16).view(np.float16)   # every bit pattern: +-0, subnormals, inf, NaN
    got, want = numba_ops.to_float32(h), ref.to_float32(h)
    assert got.dtype == np.float32
    same_bits = got.view(np.uint32) == want.view(np.uint32)
    assert np.all(same_bits | (np.isnan(got) & np.isnan(want)))


def test_to_float32_keeps_shape_and_other_dtypes():
    h = np.arange(24, dtype=np.float16).reshape(2, 3, 4)[:, ::2]      # not contiguous
    np.testing.assert_array_equal(numba_ops.to_float32(h), h.astype(np.float32))
    assert numba_ops.to_float32(np.zeros((0, 5), np.float16)).shape == (0, 5)
    d = np.linspace(-1, 1, 7)                                         # float64 goes through astype
    np.testing.assert_array_equal(numba_ops.to_float32(d), d.astype(np.float32))


def test_numba_silu_error_bound():
    """The bound numba_ops._sigmoid states: silu within 2.3e-6 of exact, over a dense sweep and
    far into both tails (where u * sigmoid(u) must go to 0 and to u)."""
    u = np.concatenate([np.linspace(-40, 40, 400_001, dtype=np.float32),
                        np.float32([-1e4, -1e3, -100, 100, 1e3, 1e4])])[None]
    x = u.copy()
    numba_ops.bias_silu_(x, np.zeros(u.shape[1], np.float32))
    exact = u.astype(np.float64) / (1 + np.exp(-u.astype(np.float64).clip(-700, 700)))
    assert np.abs(x - exact).max() <= 2.3e-6


def test_numpy_bias_silu_blocks_do_not_change_the_result():
    x, b = arrays(4, (10, 3, 5), (5,), low=-100, high=100)
    whole, blocked = x.copy(), x.copy()
    ref.bias_silu_(whole, b)
    ref.bias_silu_(blocked, b, chunk=7)                # 1 row of 5 per block, 30 blocks
    np.testing.assert_array_equal(blocked, whole)
    u = (x + b).astype(np.float64)
    np.testing.assert_allclose(whole, u / (1 + np.exp(-u)), rtol=1e-6, atol=1e-6)


B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def winograd_case(seed, nr, tx, slots, C):
    """A padded frame with rows above and below the band of tile rows that starts at row0, and
    an output buffer of noise (the slots not written must keep it)."""
    rng = np.random.default_rng(seed)
    row0 = int(rng.integers(0, 3))
    padded, out = arrays(seed, (2 * (row0 + nr) + 2 + 3, 2 * tx + 2 + 1, C), (16, nr, tx, slots, C))
    return padded, row0, out, int(rng.integers(0, slots))


@fast
@given(nr=st.integers(1, 3), tx=st.integers(1, 5), slots=st.integers(1, 3), C=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_winograd_tiles(nr, tx, slots, C, seed):
    padded, row0, out, slot = winograd_case(seed, nr, tx, slots, C)
    got, expect = out.copy(), out.copy()
    numba_ops.winograd_tiles(padded, row0, got, slot)
    ref.winograd_tiles(padded, row0, expect, slot)
    np.testing.assert_allclose(got, expect, **TOL)


@fast
@given(nr=st.integers(1, 3), tx=st.integers(1, 5), C=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_winograd_untile(nr, tx, C, seed):
    m, bias = arrays(seed, (16, nr, tx, C), (C,))
    got, expect = np.empty((2 * nr, 2 * tx, C), np.float32), np.empty((2 * nr, 2 * tx, C), np.float32)
    numba_ops.winograd_untile(m, bias, got)
    ref.winograd_untile(m, bias, expect)
    np.testing.assert_allclose(got, expect, **TOL)


def test_numpy_winograd_transforms_match_their_definition():
    """The numpy kernels themselves, tile by tile in float64: B^T d B into the slot (the other
    slots untouched), and A^T m A + bias."""
    padded, row0, out, slot = winograd_case(3, 2, 3, 3, 5)
    before = out.copy()
    ref.winograd_tiles(padded, row0, out, slot)
    for i in range(2):
        for j in range(3):
            d = padded[2 * (row0 + i):2 * (row0 + i) + 4, 2 * j:2 * j + 4].astype(np.float64)
            v = np.einsum("ay,yxc,bx->abc", B_T, d, B_T).reshape(16, -1)
            np.testing.assert_allclose(out[:, i, j, slot], v, rtol=1e-6, atol=1e-5)
    others = [s for s in range(3) if s != slot]
    np.testing.assert_array_equal(out[..., others, :], before[..., others, :])
    m, bias = arrays(4, (16, 2, 3, 5), (5,))
    y = np.empty((4, 6, 5), np.float32)
    ref.winograd_untile(m, bias, y)
    for i in range(2):
        for j in range(3):
            tile = np.einsum("ya,abc,xb->yxc", A_T, m[:, i, j].reshape(4, 4, 5).astype(np.float64), A_T)
            np.testing.assert_allclose(y[2 * i:2 * i + 2, 2 * j:2 * j + 2], tile + bias, rtol=1e-6, atol=1e-5)
