"""The numpy denoiser against the official MobileI2V code (fixture made with the official class)."""
from __future__ import annotations

import numpy as np
import pytest

import tinyi2v
from tinyi2v import denoiser, ops
from tinyi2v.convert import convert_mobilei2v
from tinyi2v.errors import TinyI2VError

from conftest import OFFICIAL, need, random_denoiser_params, softmax_block_case

PARITY = 1e-4          # fixture README: float32 vs float64 of the official model differ by 2.5e-6


def case(name):
    def load(key):
        return np.load(need(OFFICIAL / f"case_{name}_{key}.npy"))

    return (load("x"), load("timestep"), load("cond_mask"), load("flow_score")), load("out")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The official checkpoint converted twice: F32 (exact) and F16 (the shipping format)."""
    ckpt = need(OFFICIAL / "mobiledit-tiny-random.pth")
    root = tmp_path_factory.mktemp("official")
    return {dtype: convert_mobilei2v(ckpt, root / dtype, dtype=dtype, log=lambda m: None)
            for dtype in ("float32", "float16")}


@pytest.mark.parametrize("name", ["a", "b"])
def test_parity_with_official_code(converted, name):
    inputs, expect = case(name)
    out = tinyi2v.load_denoiser(converted["float32"])(*inputs)
    err = np.abs(out - expect).max()
    print(f"case {name} [{ops.backend()}]: F32 weights max abs err {err:.2e} (outputs up to "
          f"{np.abs(expect).max():.2f})")
    assert out.shape == expect.shape and err <= PARITY, err


@pytest.mark.parametrize("name", ["a", "b"])
def test_fp16_storage_error_is_measured(converted, name, capsys):
    """FP16 storage rounds the weights; the resulting error is reported, not hidden."""
    inputs, expect = case(name)
    err = np.abs(tinyi2v.load_denoiser(converted["float16"])(*inputs) - expect).max()
    with capsys.disabled():
        print(f"\n  case {name} [{ops.backend()}]: F16 weights max abs err {err:.2e} "
              f"vs official F32 (outputs up to {np.abs(expect).max():.2f})")
    assert err < 2e-2, err      # FP16 keeps ~3 decimal digits of each weight


@pytest.mark.parametrize("name", ["a", "b"])
def test_intermediates_match(converted, name):
    """Walk the forward pass piece by piece and compare with the official intermediates."""
    (x, t, mask, flow), _ = case(name)
    ref = np.load(OFFICIAL / f"case_{name}_intermediates.npz")
    f = tinyi2v.load_denoiser(converted["float32"])
    p, cfg = f.params, f.config
    B, C, T, H, W = x.shape
    S = H * W

    def check(key, got):
        np.testing.assert_allclose(got, ref[key], atol=PARITY, rtol=0, err_msg=key)

    temb, mod, index = denoiser.conditioning(p, t, mask, flow, cfg)
    femb = denoiser.embed_scalar(p, "flow_embedder", flow, cfg["freq_dim"])       # [B, D]
    f0 = denoiser.linear(denoiser.silu(femb), p["flow_block.1.weight"], p["flow_block.1.bias"])
    rows = index[:, [0, S]]                        # [B, 2]: a guide token's row, a noisy token's
    check("t_embedder_rows", temb[rows])
    check("t_block_rows", mod[np.arange(B)[:, None], rows] - f0[:, None])      # mod = t0 + f0
    check("flow_embedder_row", femb[:, None])
    check("flow_block_row", f0[:, None])

    rope = denoiser.rope_tables(T, H, W, cfg["head_dim"], cfg["rope_scales"], cfg["rope_theta"])
    h = denoiser.patch_embed(p, x)
    check("after_patch_embed", h)
    for i in range(cfg["num_blocks"]):
        denoiser.block(p, i, h, mod, index, rope, (T, H, W), cfg)
        if f"after_block_{i}" in ref:
            check(f"after_block_{i}", h)
    check("before_final_layer", h)
    check("final_layer_out", denoiser.final_layer(p, h, temb, index, cfg))


def test_batch_is_independent_and_mask_broadcasts(converted):
    """Batched call == one sample at a time, and a [1, N] cond_mask serves every sample."""
    (x, t, mask, flow), _ = case("b")
    f = tinyi2v.load_denoiser(converted["float32"])
    batched = f(x, t, mask[:1], flow)
    for b in range(2):
        single = f(x[b:b + 1], t[b:b + 1], mask[b:b + 1], flow[b:b + 1])
        np.testing.assert_allclose(batched[b:b + 1], single, atol=1e-5, rtol=0)


def test_any_grid_and_guide_tokens_get_timestep_zero():
    """Nothing is tied to 2760 tokens; guide tokens see t=0 whatever the timestep."""
    cfg = denoiser.official_config(in_channels=8, hidden_size=144, num_blocks=2,
                                   softmax_blocks=(1,), mlp_hidden_size=48)
    p = random_denoiser_params(cfg)
    f = tinyi2v.Denoiser(p, cfg)
    rng = np.random.default_rng(1)
    for T, H, W in [(1, 1, 1), (2, 5, 3), (4, 2, 7)]:
        x = rng.standard_normal((1, 8, T, H, W)).astype(np.float32)
        mask = np.zeros((1, T * H * W), np.float32)
        mask[:, :H * W] = 1
        assert f(x, [500.0], mask, [2.0]).shape == x.shape
        # Timestep 0 everywhere vs timestep 0 on the guide only: at t=0 the mask is irrelevant.
        np.testing.assert_allclose(f(x, [0.0], mask, [2.0]), f(x, [0.0], mask * 0, [2.0]),
                                   atol=1e-6)


def test_softmax_attention_chunks_do_not_change_the_result():
    """Query chunks (here 7 queries, N = 60 not a multiple) give the one-chunk result, batched."""
    cfg, p, rope = softmax_block_case()
    a = np.random.default_rng(2).standard_normal((2, 60, 144)).astype(np.float32)
    whole = denoiser.softmax_attention_block(p, "blocks.0.", a, rope, cfg, query_chunk=60)
    chunked = denoiser.softmax_attention_block(p, "blocks.0.", a, rope, cfg, query_chunk=7)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    one = denoiser.softmax_attention_block(p, "blocks.0.", a[1:], rope, cfg, query_chunk=7)
    np.testing.assert_allclose(chunked[1:], one, atol=1e-6, rtol=0)


def test_softmax_attention_exact_when_scores_span_hundreds():
    """Scores over 80 below their row's maximum are raised to -80 (their exp would be a slow
    subnormal float): the result must still be float64 softmax attention's, here with scores
    spanning more than the 150 a trained model reaches (a floor of -10 instead fails this)."""
    cfg, p, rope = softmax_block_case()
    p["blocks.0.attn.qkv.weight"][:288] *= 6                   # q and k rows: scores ~36x
    a = np.random.default_rng(3).standard_normal((1, 60, 144)).astype(np.float32)
    out = denoiser.softmax_attention_block(p, "blocks.0.", a, rope, cfg, query_chunk=16)

    qkv = denoiser.linear(a, p["blocks.0.attn.qkv.weight"], p["blocks.0.attn.qkv.bias"])
    q, k = (ops.rope3d(qkv[..., i:i + 144].reshape(1, 60, 2, 72), *rope).astype(np.float64)
            for i in (0, 144))                                 # [1, N, heads, 72]
    v = qkv[..., 288:].reshape(1, 60, 2, 72).astype(np.float64)
    scores = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(72)  # [1, heads, N, N]
    span = (scores.max(-1) - scores.min(-1)).max()
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    o = np.einsum("bhnm,bmhd->bnhd", weights / weights.sum(-1, keepdims=True), v)
    expect = denoiser.linear(o.reshape(1, 60, 144), p["blocks.0.attn.proj.weight"].astype(
        np.float64), p["blocks.0.attn.proj.bias"])
    assert span > 200, span
    np.testing.assert_allclose(out, expect, atol=2e-5 * np.abs(expect).max(), rtol=0)


def test_bad_inputs_state_the_rule():
    cfg = denoiser.official_config(in_channels=8, hidden_size=144, num_blocks=1,
                                   softmax_blocks=(), mlp_hidden_size=16)
    f = tinyi2v.Denoiser(random_denoiser_params(cfg), cfg)
    x = np.zeros((1, 8, 2, 2, 2), np.float32)
    with pytest.raises(TinyI2VError, match=r"x must be \[B, 8, T, H, W\], got \[1, 4"):
        f(np.zeros((1, 4, 2, 2, 2)), [1.0], np.zeros((1, 8)), [1.0])
    with pytest.raises(TinyI2VError, match="cond_mask must be"):
        f(x, [1.0], np.zeros((1, 7)), [1.0])
    with pytest.raises(TinyI2VError, match="timestep and flow_score must be"):
        f(x, [1.0, 2.0], np.zeros((1, 8)), [1.0])
