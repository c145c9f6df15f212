"""The LTX-Video VAE port: fixture parity, streamed == layer-by-layer decode, the layers against
torch, live parity with diffusers on two other tiny configs, config and folder errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED, need

from tinyi2v.errors import FormatError, TinyI2VError
from tinyi2v.io.safetensors import load_file, save_file
from tinyi2v.vae import LTXVideoVAE, layers, load_vae
from tinyi2v.vae.ltx import official_config, run_stages
from tinyi2v.weights import save_component

FIXTURE = SHARED / "fixtures" / "ltx-vae-tiny"
TOL = 1e-4


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def fixture_vae() -> LTXVideoVAE:
    return load_vae(need(FIXTURE))


# ----------------------------------------------------------------------------- fixture parity

@pytest.mark.parametrize("case", ["video", "image"])
def test_fixture_encode(fixture_vae, case):
    mean, logvar = fixture_vae.encode(np.load(FIXTURE / f"{case}_input.npy"))
    assert max_diff(mean, np.load(FIXTURE / f"{case}_posterior_mean.npy")) < TOL
    assert max_diff(logvar, np.load(FIXTURE / f"{case}_posterior_logvar.npy")) < TOL


@pytest.mark.parametrize("case", ["video", "image"])
@pytest.mark.parametrize("streaming", [True, False])
def test_fixture_decode(fixture_vae, case, streaming):
    latent = np.load(FIXTURE / f"{case}_posterior_mean.npy")
    video = fixture_vae.decode(latent, streaming=streaming, slab_bytes=1)
    assert max_diff(video, np.load(FIXTURE / f"{case}_decoded.npy")) < TOL


def test_fixture_intermediates(fixture_vae):
    expected = np.load(FIXTURE / "video_intermediates.npz")
    record: dict = {}
    video = np.load(FIXTURE / "video_input.npy")[0].transpose(1, 2, 3, 0)   # [T, H, W, 3]
    fixture_vae.encode_sample(np.ascontiguousarray(video), record)
    latent = np.load(FIXTURE / "video_posterior_mean.npy")[0].transpose(1, 2, 3, 0)
    cfg = fixture_vae.config
    run_stages(fixture_vae.params, fixture_vae.decoder, np.ascontiguousarray(latent),
               cfg["decoder_causal"], cfg["resnet_norm_eps"], record, "decoder_")
    assert set(expected.files) <= set(record)         # the fixture stops before decoder conv_out
    for name in expected.files:
        assert max_diff(record[name].transpose(3, 0, 1, 2)[None], expected[name]) < TOL, name


def test_attributes(fixture_vae):
    assert (fixture_vae.latent_channels, fixture_vae.spatial_compression,
            fixture_vae.temporal_compression) == (8, 32, 8)


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("shape", [(1, 8, 3, 3, 5), (1, 8, 1, 1, 2), (2, 8, 2, 4, 1)])
@pytest.mark.parametrize("slab_bytes", [1, 20_000])     # one row per slab / a few rows
def test_streamed_decode_equals_layer_by_layer(fixture_vae, shape, slab_bytes):
    latent = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
    steps = []
    streamed = fixture_vae.decode(latent, progress=lambda *a: steps.append(a),
                                  slab_bytes=slab_bytes)
    plain = fixture_vae.decode(latent, streaming=False)
    assert streamed.shape == (shape[0], 3, 8 * (shape[2] - 1) + 1, 32 * shape[3], 32 * shape[4])
    assert max_diff(streamed, plain) < 1e-5
    assert steps[-1][:3] == ("decode", shape[0] * 32 * shape[3], shape[0] * 32 * shape[3])


def test_batch_is_per_sample(fixture_vae):
    video = np.random.default_rng(0).uniform(-1, 1, (2, 3, 2, 32, 64)).astype(np.float32)
    mean, logvar = fixture_vae.encode(video)
    one_mean, one_logvar = fixture_vae.encode(video[1:])
    assert max_diff(mean[1:], one_mean) < 1e-6 and max_diff(logvar[1:], one_logvar) < 1e-6
    assert max_diff(fixture_vae.decode(mean)[1:], fixture_vae.decode(one_mean)) < 1e-6


# ----------------------------------------------------------------------------- layers vs torch

def channels_last(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))          # [C, T, H, W] -> [T, H, W, C]


@pytest.mark.parametrize("frames, kernel, stride, temporal_pad", [
    (5, (3, 3, 3), (1, 1, 1), (2, 0)),      # causal
    (4, (3, 3, 3), (1, 1, 1), (1, 1)),      # non-causal
    (6, (3, 3, 3), (2, 2, 2), (2, 0)),      # the encoder's downsampler, odd sizes
    (1, (3, 3, 3), (2, 2, 2), (2, 0)),      # one frame: the summed-kernel path
    (3, (1, 1, 1), (1, 1, 1), (0, 0)),
    (7, (5, 5, 5), (1, 1, 1), (2, 2)),
    (4, (3, 5, 3), (1, 2, 3), (2, 0)),
])
# The default band holds the positions in a ring (rolled taps); a tiny one makes the taps too
# big to roll, so each output frame copies its positions in order, one output row per band.
@pytest.mark.parametrize("band_bytes", [layers.BAND_BYTES, 1000], ids=["ring", "in-order"])
def test_conv3d_matches_torch(frames, kernel, stride, temporal_pad, band_bytes, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(layers, "BAND_BYTES", band_bytes)
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((3, frames, 9, 11), dtype=np.float32)
    w = rng.standard_normal((4, 3) + kernel, dtype=np.float32) / np.float32(np.sqrt(3 * np.prod(kernel)))
    b = rng.standard_normal(4, dtype=np.float32)
    xt = torch.from_numpy(x)[None]
    xt = torch.cat([xt[:, :, :1]] * temporal_pad[0] + [xt] + [xt[:, :, -1:]] * temporal_pad[1], 2)
    expected = torch.nn.functional.conv3d(xt, torch.from_numpy(w), torch.from_numpy(b), stride,
                                          (0, kernel[1] // 2, kernel[2] // 2))[0].numpy()
    got = layers.conv3d(channels_last(x), w, b, stride, temporal_pad)
    assert got.shape == channels_last(expected).shape
    assert max_diff(got, channels_last(expected)) < 1e-5
    fp16 = layers.conv3d(channels_last(x), w.astype(np.float16), b, stride, temporal_pad)
    assert max_diff(fp16, layers.conv3d(channels_last(x), w.astype(np.float16).astype(np.float32),
                                        b, stride, temporal_pad)) < 1e-6


@pytest.mark.parametrize("frames, temporal_pad, cin, H, W", [
    (5, (2, 0), 3, 9, 11),      # causal, odd sizes: the tiles' extra row and column dropped
    (4, (1, 1), 6, 8, 10),      # non-causal, even sizes
    (1, (2, 0), 3, 9, 11),      # one frame: the summed kernel, kt = 1
])
@pytest.mark.parametrize("band_bytes", [layers.BAND_BYTES, 1000], ids=["ring", "in-order"])
def test_winograd_conv3d_matches_torch(frames, temporal_pad, cin, H, W, band_bytes, monkeypatch):
    """The Winograd path (taken for every channel count here) against torch's direct conv3d and
    conv2d, with padded rows and with rows the caller supplies (pad_rows=False)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    monkeypatch.setattr(layers, "BAND_BYTES", band_bytes)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)
    calls = []
    winograd = layers._conv_winograd
    monkeypatch.setattr(layers, "_conv_winograd", lambda *a: calls.append(1) or winograd(*a))
    rng = np.random.default_rng(frames + cin)
    x = rng.standard_normal((cin, frames, H, W), dtype=np.float32)
    w = rng.standard_normal((4, cin, 3, 3, 3), dtype=np.float32) / np.float32(np.sqrt(27 * cin))
    b = rng.standard_normal(4, dtype=np.float32)
    xt = torch.from_numpy(x)[None]
    xt = torch.cat([xt[:, :, :1]] * temporal_pad[0] + [xt] + [xt[:, :, -1:]] * temporal_pad[1], 2)
    expected = channels_last(F.conv3d(xt, torch.from_numpy(w), torch.from_numpy(b),
                                      padding=(0, 1, 1))[0].numpy())
    got = layers.conv3d(channels_last(x), w, b, temporal_pad=temporal_pad)
    assert got.shape == expected.shape and max_diff(got, expected) < 1e-5
    rows = layers.conv3d(channels_last(x), w.astype(np.float16), b, temporal_pad=temporal_pad,
                         pad_rows=False)
    half = layers.conv3d(channels_last(x), w.astype(np.float16).astype(np.float32), b,
                         temporal_pad=temporal_pad)
    assert max_diff(rows, half[:, 1:-1]) < 1e-6
    expected2d = F.conv2d(torch.from_numpy(x).permute(1, 0, 2, 3), torch.from_numpy(w[:, :, 0]),
                          torch.from_numpy(b), padding=1).permute(0, 2, 3, 1)
    assert max_diff(layers.conv2d(channels_last(x), w[:, :, 0], b), expected2d) < 1e-5
    assert len(calls) == 4


def test_conv2d_and_depthwise_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 7, 9), dtype=np.float32)             # [C, T, H, W]
    w2 = rng.standard_normal((5, 3, 3, 3), dtype=np.float32)
    expected = F.conv2d(torch.from_numpy(x).permute(1, 0, 2, 3), torch.from_numpy(w2), padding=1)
    assert max_diff(layers.conv2d(channels_last(x), w2), expected.permute(0, 2, 3, 1)) < 1e-5
    wd = rng.standard_normal((3, 1, 5, 5, 5), dtype=np.float32)
    bd = rng.standard_normal(3, dtype=np.float32)
    xt = torch.from_numpy(x)[None]
    xt = torch.cat([xt[:, :, :1]] * 2 + [xt] + [xt[:, :, -1:]] * 2, 2)
    expected = F.conv3d(xt, torch.from_numpy(wd), torch.from_numpy(bd), padding=(0, 2, 2),
                        groups=3)[0].numpy()
    got = layers.depthwise_conv3d(channels_last(x), wd, bd, (2, 2))
    assert max_diff(got, channels_last(expected)) < 1e-5


def test_rearrangements_follow_diffusers_order():
    """patchify: channel c*p*p + col*p + row; depth_to_space_ltx: channel c*8 + dt*4 + dy*2 + dx,
    first frame dropped; the two unpatchify/patchify directions are inverses."""
    rng = np.random.default_rng(6)
    video = rng.standard_normal((2, 8, 12, 3), dtype=np.float32)       # [T, H, W, C]
    patched = layers.patchify(video, 4)
    t, h, w, c, col, row = 1, 1, 2, 2, 3, 1
    assert patched[t, h, w, c * 16 + col * 4 + row] == video[t, 4 * h + row, 4 * w + col, c]
    assert np.array_equal(layers.unpatchify(patched, 4), video)
    x = rng.standard_normal((3, 2, 4, 8 * 5), dtype=np.float32)
    y = layers.depth_to_space_ltx(x)
    assert y.shape == (5, 4, 8, 5)
    for t, dt, i, dy, j, dx, c in [(0, 1, 1, 0, 3, 1, 4), (2, 0, 0, 1, 2, 0, 0), (1, 1, 1, 1, 0, 0, 2)]:
        assert y[2 * t + dt - 1, 2 * i + dy, 2 * j + dx, c] == x[t, i, j, c * 8 + dt * 4 + dy * 2 + dx]


def test_norms_match_definitions():
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 6), dtype=np.float32)
    x64 = x.astype(np.float64)
    rms = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-8)
    assert max_diff(layers.pixel_norm(x), rms) < 1e-5
    assert max_diff(layers.pixel_norm_silu(x), rms / (1 + np.exp(-rms))) < 1e-5
    g, b = np.arange(6, dtype=np.float32), np.ones(6, np.float32)
    centred = x64 - x64.mean(-1, keepdims=True)
    ln = centred / np.sqrt(np.mean(centred ** 2, axis=-1, keepdims=True) + 1e-6) * g + b
    assert max_diff(layers.layer_norm(x, g, b, 1e-6), ln) < 1e-5


# ----------------------------------------------------------------------------- live diffusers

def tiny_config(**changes) -> dict:
    cfg = official_config()
    del cfg["_class_name"]
    return cfg | changes


CONFIGS = {
    # patch 2, three blocks with the middle one not scaling, FP32 weights
    "patch2-3blocks-f32": (tiny_config(
        latent_channels=4, patch_size=2,
        block_out_channels=[8, 12, 16], layers_per_block=[1, 2, 1, 1],
        spatio_temporal_scaling=[True, True, False], down_block_types=["LTXVideoDownBlock3D"] * 3,
        downsample_type=["conv"] * 3,
        decoder_block_out_channels=[6, 10, 16], decoder_layers_per_block=[1, 1, 2, 1],
        decoder_spatio_temporal_scaling=[True, False, True], decoder_inject_noise=[False] * 4,
        upsample_residual=[False] * 3, upsample_factor=[1] * 3), "F32",
        (1, 3, 5, 14, 22), (1, 4, 2, 3, 5)),
    # the 0.9.0 layout at other widths, a causal decoder, FP16 weights, batch 2
    "patch4-causal-decoder-f16": (tiny_config(
        latent_channels=6, block_out_channels=[4, 8, 8, 12], layers_per_block=[2, 1, 1, 1, 2],
        decoder_block_out_channels=[8, 8, 12, 12], decoder_layers_per_block=[1, 1, 2, 1, 1],
        decoder_causal=True), "F16",
        (2, 3, 9, 36, 28), (2, 6, 2, 3, 1)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def live_pair(request, tmp_path_factory):
    """(torch model, our model, video shape, latent shape) sharing seeded random weights."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.set_num_threads(1)
    cfg, dtype, video_shape, latent_shape = CONFIGS[request.param]
    net = diffusers.AutoencoderKLLTXVideo(**cfg).eval()
    rng = np.random.default_rng(len(request.param))
    tensors = {}
    for name, t in net.state_dict().items():
        fan_in = int(np.prod(t.shape[1:])) if t.ndim > 1 else 0
        a = rng.standard_normal(tuple(t.shape)) * (fan_in ** -0.5 if fan_in else 0.1)
        a += 1.0 if name.endswith(("norm3.weight", "latents_std")) else 0.0
        # the FP16 case: torch gets exactly the values the FP16 file holds
        tensors[name] = a.astype(np.float16 if dtype == "F16" else np.float32).astype(np.float32)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    folder = save_component(tmp_path_factory.mktemp("vae") / "vae",
                            {"_class_name": "AutoencoderKLLTXVideo", **cfg}, tensors, dtype)
    return net, load_vae(folder), video_shape, latent_shape


def test_live_encode(live_pair):
    import torch

    net, vae, video_shape, _ = live_pair
    video = np.random.default_rng(2).uniform(-1, 1, video_shape).astype(np.float32)
    with torch.inference_mode():
        posterior = net.encode(torch.from_numpy(video)).latent_dist
    mean, logvar = vae.encode(video)
    scale = max(1.0, float(np.abs(posterior.mean.numpy()).max()))
    assert max_diff(mean, posterior.mean.numpy()) < TOL * scale
    assert max_diff(logvar, posterior.logvar.numpy()) < TOL * scale


def test_live_single_frame_encode_is_frame_zero(live_pair):
    """The one-frame (2D, summed-kernel) path equals latent frame 0 of the causal video encode,
    and diffusers' own one-frame encode."""
    import torch

    net, vae, video_shape, _ = live_pair
    video = np.random.default_rng(3).uniform(-1, 1, video_shape).astype(np.float32)
    frame_mean, _ = vae.encode(video[:, :, :1])
    video_mean, _ = vae.encode(video)
    with torch.inference_mode():
        expected = net.encode(torch.from_numpy(video[:, :, :1])).latent_dist.mean.numpy()
    assert frame_mean.shape[2] == 1
    assert max_diff(frame_mean, video_mean[:, :, :1]) < TOL
    assert max_diff(frame_mean, expected) < TOL


@pytest.mark.parametrize("streaming", [True, False])
def test_live_decode(live_pair, streaming):
    import torch

    net, vae, _, latent_shape = live_pair
    latent = np.random.default_rng(4).standard_normal(latent_shape, dtype=np.float32)
    with torch.inference_mode():
        expected = net.decode(torch.from_numpy(latent)).sample.numpy()
    video = vae.decode(latent, streaming=streaming, slab_bytes=1)
    assert video.shape == expected.shape
    assert max_diff(video, expected) < TOL * max(1.0, float(np.abs(expected).max()))


def test_bf16_folder_equals_its_float32_values(fixture_vae, tmp_path):
    """A BF16 file decodes exactly like a float32 dict holding the same (rounded) values."""
    params = {k: fixture_vae.params[k] for k in fixture_vae.params}
    folder = save_component(tmp_path / "vae", fixture_vae.config, params, dtype="BF16")
    bf16 = load_vae(folder)
    rounded = LTXVideoVAE({k: bf16.params[k] for k in bf16.params}, bf16.config)
    latent = np.load(FIXTURE / "video_posterior_mean.npy")
    assert max_diff(bf16.decode(latent), rounded.decode(latent)) == 0.0
    assert max_diff(bf16.decode(latent), fixture_vae.decode(latent)) < 0.1   # BF16 rounding


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def fixture_copy(tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(need(FIXTURE), folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("field, value", [
    ("timestep_conditioning", True),
    ("decoder_inject_noise", [False, True, True, True, True]),
    ("upsample_residual", [True] * 4),
    ("upsample_factor", [2] * 4),
    ("down_block_types", ["LTXVideo095DownBlock3D"] * 4),
    ("downsample_type", ["spatial", "temporal", "spatiotemporal", "spatiotemporal"]),
    ("patch_size_t", 2),
    ("layers_per_block", [1, 1, 1, 1]),
])
def test_unsupported_config_is_refused(fixture_copy, field, value):
    edit_config(fixture_copy, **{field: value})
    with pytest.raises(FormatError, match=f"{field} = {value!r}".replace("[", r"\[")
                       .replace("]", r"\]")):
        load_vae(fixture_copy)


def test_missing_and_misshaped_tensors_are_named(fixture_copy):
    weights = fixture_copy / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["decoder.conv_out.conv.bias"]
    tensors["encoder.conv_in.conv.weight"] = tensors["encoder.conv_in.conv.weight"][:4]
    save_file(tensors, weights)
    with pytest.raises(FormatError, match=r"missing: decoder\.conv_out\.conv\.bias.*"
                                          r"wrong shape: encoder\.conv_in\.conv\.weight"):
        load_vae(fixture_copy)


def test_unknown_class_is_refused(fixture_copy):
    edit_config(fixture_copy, _class_name="AutoencoderKL")
    with pytest.raises(FormatError, match="AutoencoderKL"):
        load_vae(fixture_copy)


def test_model_folder_with_vae_inside(tmp_path, fixture_copy):
    (fixture_copy.parent / "model_index.json").write_text("{}")
    assert load_vae(fixture_copy.parent).latent_channels == 8


def test_bad_input_shapes(fixture_vae):
    with pytest.raises(TinyI2VError, match="video must be"):
        fixture_vae.encode(np.zeros((1, 3, 1, 30, 64), np.float32))   # 30 is not a multiple of 4
    with pytest.raises(TinyI2VError, match="latent must be"):
        fixture_vae.decode(np.zeros((1, 4, 1, 2, 2), np.float32))
