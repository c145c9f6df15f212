"""Turbo-VAED decoder: fixture parity, row streaming vs a whole-clip reference, errors, and the
`tinyi2v convert --from turbo-vaed / folder` commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SHARED, need, random_params

from tinyi2v.cli import cli
from tinyi2v.convert import convert_turbo_vaed
from tinyi2v.errors import FormatError, TinyI2VError
from tinyi2v.io.safetensors import load_file
from tinyi2v.vae.layers import (
    conv2d,
    conv3d,
    depthwise_conv3d,
    layer_norm,
    linear,
    pixel_norm,
    pixel_norm_silu,
    relu,
)
from tinyi2v.vae.streaming import stream_rows
from tinyi2v.vae.turbo_vaed import (
    CLASS_NAME,
    TurboVAEDDecoder,
    architecture,
    official_config,
    param_shapes,
)
from tinyi2v.weights import Component, save_component

FIXTURE = SHARED / "fixtures" / "turbo-vaed-tiny"
LTX_FIXTURE = SHARED / "fixtures" / "ltx-vae-tiny"
WEIGHTS = "turbo_vaed_decoder.safetensors"

# Every feature at once, at odd sizes. Decoding order: mid block 24 (depthwise), up0 24 -> 16
# (depthwise, so a depthwise 1x1x1 shortcut), up1 16 -> 8 + upsampler + depthwise resnet with
# ReLU first, up2 8 -> 16 (dense LayerNorm shortcut) + upsampler, up3 16 + upsampler + 2 resnets,
# one 2D stage (patch size 2) to 4 channels, conv_out.
ODD_CONFIG = official_config() | {
    "latent_channels": 4, "decoder_block_out_channels": [16, 8, 16, 24],
    "decoder_layers_per_block": [2, 1, 1, 2, 1],
    "decoder_is_dw_conv": [False, False, True, True, True],
    "patch_size": 2,
}


def materialize(slabs) -> np.ndarray:
    """The whole activation [T, H, W, C] of a stream of row slabs."""
    return np.concatenate(list(slabs), axis=1)


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    return random_params(param_shapes(cfg), seed)


def reference_decode(p, cfg: dict, latent: np.ndarray) -> np.ndarray:
    """Whole-clip decode written directly from the upstream module structure (no streaming):
    latent [C, T, H, W] -> video [3, T', H', W']."""
    arch = architecture(cfg)

    def conv(x, name, kernel, depthwise=False):                # replicate pad kernel//2 in time
        pad = (kernel // 2, kernel // 2)
        if depthwise:
            x = depthwise_conv3d(x, p[f"{name}.depthwise_conv.weight"],
                                 p[f"{name}.depthwise_conv.bias"], pad)
            return linear(x, p[f"{name}.pointwise_conv.weight"], p[f"{name}.pointwise_conv.bias"])
        return conv3d(x, p[f"{name}.conv.weight"], p[f"{name}.conv.bias"], temporal_pad=pad)

    def resnet(x, name, depthwise, relu_first):
        kernel = arch.dw_kernel_size if depthwise else 3
        h = relu(pixel_norm(x)) if relu_first else pixel_norm_silu(x)
        h = conv(h, f"{name}.conv1", kernel, depthwise)
        h = conv(pixel_norm_silu(h), f"{name}.conv2", kernel, depthwise)
        if f"{name}.norm3.weight" in p:
            x = layer_norm(x, p[f"{name}.norm3.weight"], p[f"{name}.norm3.bias"], arch.norm_eps)
            x = conv(x, f"{name}.conv_shortcut", 1, depthwise)
        return h + x

    def upsample(x, name):                                    # upstream's three steps, in order
        y = conv(x, name, 3)                                  # [T, H, W, 8C], channel c'*2 + dt
        T, H, W, C8 = y.shape
        y = y.reshape(T, H, W, C8 // 2, 2).transpose(0, 4, 1, 2, 3).reshape(2 * T, H, W, C8 // 2)
        y = y.reshape(2 * T, H, W, C8 // 8, 2, 2).transpose(0, 1, 4, 2, 5, 3)   # c' = c*4+dy*2+dx
        return y.reshape(2 * T, 2 * H, 2 * W, C8 // 8)[1:]

    x = conv(latent.transpose(1, 2, 3, 0), "conv_in", 3)
    mid, *ups = arch.blocks
    for j in range(mid.num_layers):
        x = resnet(x, f"mid_block.resnets.{j}", mid.depthwise, False)
    for i, block in enumerate(ups):
        if block.in_channels != block.out_channels:
            x = resnet(x, f"up_blocks.{i}.conv_in", block.depthwise, False)
        if block.upsample:
            x = upsample(x, f"up_blocks.{i}.upsamplers.0.conv")
        for j in range(block.num_layers):
            x = resnet(x, f"up_blocks.{i}.resnets.{j}", block.depthwise, block.upsample)
    for stage in range(1, arch.num_2d_stages + 1):
        y = conv2d(pixel_norm_silu(x), p[f"upsampler2d_{stage}.conv.weight"],
                   p[f"upsampler2d_{stage}.conv.bias"])
        F, H, W, C4 = y.shape
        x = y.reshape(F, H, W, C4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(
            F, 2 * H, 2 * W, C4 // 4)
    return conv(pixel_norm_silu(x), "conv_out", 3).transpose(3, 0, 1, 2)


def write_component(path, cfg: dict, weights: dict, dtype: str = "F32"):
    return Component(save_component(path, cfg, weights, dtype=dtype))


@pytest.fixture(scope="module")
def fixture_decoder():
    return TurboVAEDDecoder(Component(need(FIXTURE)))


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    weights = random_weights(ODD_CONFIG)
    # distillation heads, present in full-model checkpoints, are ignored
    weights["aligned_feature_projection_heads.0.0.conv.weight"] = np.ones((4, 2, 1, 1, 1),
                                                                          np.float32)
    folder = tmp_path_factory.mktemp("odd") / "c"
    return TurboVAEDDecoder(write_component(folder, ODD_CONFIG, weights)), weights


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", ["video", "image"])
def test_fixture_parity(fixture_decoder, case):
    latent = np.load(FIXTURE / f"{case}_latent.npy")
    expected = np.load(FIXTURE / f"{case}_decoded.npy")
    got = fixture_decoder.decode(latent)
    assert got.shape == expected.shape and got.dtype == np.float32
    err = np.abs(got - expected)
    # the last pixel norm runs over 2 channels and is ill-conditioned where both are near 0
    # (fixture README: float32 vs float64 of upstream itself differ by up to 9e-5)
    assert err.max() <= 5e-4
    assert np.quantile(err, 0.999) <= 1e-4


def test_fixture_intermediates(fixture_decoder):
    latent = np.load(FIXTURE / "video_latent.npy")[0]
    expected = np.load(FIXTURE / "video_intermediates.npz")
    names = [name for name, _ in fixture_decoder.stages(latent)]
    checked = 0
    for name in names:
        key = "decoder_" + name.replace(".", "_")
        if key in expected:
            stream = dict(fixture_decoder.stages(latent))[name]    # a fresh chain per stage
            got = materialize(stream).transpose(3, 0, 1, 2)
            np.testing.assert_allclose(got, expected[key][0], atol=2e-5, rtol=0, err_msg=key)
            checked += 1
    assert checked == len(expected.files) == 6


def test_attributes(fixture_decoder):
    d = fixture_decoder
    assert (d.latent_channels, d.spatial_compression, d.temporal_compression) == (8, 32, 8)
    assert d.output_shape((2, 8, 3, 23, 40)) == (2, 3, 17, 736, 1280)


def test_official_config_size():
    shapes = param_shapes(official_config())
    assert len(shapes) == 86                                 # docs/ltx-vae.md §3
    assert sum(int(np.prod(s)) for s in shapes.values()) == 41_896_023


@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("slab_bytes", [1, 20_000])        # one row per slab / a few rows
def test_streamed_equals_layer_by_layer(odd_model, frames, slab_bytes):
    """Row streaming (5x5x5 depthwise and 3x3 kernels, upsamplers, odd sizes) against the same
    layers on whole tensors (one slab) and against the independent whole-clip reference."""
    decoder, weights = odd_model
    latent = np.random.default_rng(frames).normal(size=(2, 4, frames, 3, 5)).astype(np.float32)
    calls = []
    got = decoder.decode(latent, progress=lambda *a: calls.append(a), slab_bytes=slab_bytes)
    whole = decoder.decode(latent, slab_bytes=2**40)
    T = (frames - 1) * 8 + 1
    assert got.shape == whole.shape == (2, 3, T, 48, 80)
    assert np.abs(got - whole).max() <= 1e-5
    for b in range(2):
        np.testing.assert_allclose(got[b], reference_decode(weights, ODD_CONFIG, latent[b]),
                                   rtol=1e-5, atol=1e-5)
    rows = [c[1] for c in calls]
    assert len(rows) >= 2 * 3 and rows == sorted(set(rows)) and rows[-1] == 2 * 48
    assert all(c[0] == "decode" and c[2] == 2 * 48 for c in calls)


@pytest.mark.parametrize("height, slab_rows", [(7, 1), (7, 2), (9, 3), (8, 5), (6, 6)])
@pytest.mark.parametrize("scale", [1, 2])                    # a conv / an upsampler
def test_stream_rows_calls_start_on_even_rows(height, slab_rows, scale):
    """Every output row once and in order, and every call of the layer starts on an even row,
    so a Winograd conv tiles as on the whole tensor."""
    x = np.arange(height, dtype=np.float32).reshape(1, height, 1, 1) + 1     # row r holds r + 1
    starts = []

    def centre_rows(rows, pad_rows):                            # a 3x3 conv's row bookkeeping
        assert pad_rows is False
        starts.append(int(rows[0, 1, 0, 0]) - 1)                # never padding: a real row
        return np.repeat(rows[:, 1:-1], scale, axis=1)

    slabs = (x[:, r:r + slab_rows] for r in range(0, height, slab_rows))
    got = np.concatenate(list(stream_rows(centre_rows, slabs, height)), axis=1)
    np.testing.assert_array_equal(got, np.repeat(x, scale, axis=1))
    assert starts and all(r % 2 == 0 for r in starts)


# ----------------------------------------------------------------------------- errors

def test_encode_is_refused(fixture_decoder):
    with pytest.raises(TinyI2VError, match="decoder only; encode with the LTX-Video VAE"):
        fixture_decoder.encode(np.zeros((1, 3, 1, 64, 96), np.float32))


def test_bad_latent_shape(fixture_decoder):
    with pytest.raises(TinyI2VError, match=r"latent must be \[B, 8, T, H, W\]"):
        fixture_decoder.decode(np.zeros((1, 4, 2, 2, 3), np.float32))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    weights = load_file(need(FIXTURE) / WEIGHTS)
    del weights["up_blocks.1.resnets.0.conv2.conv.bias"]
    weights["norm_out.running_mean"] = np.zeros(2, np.float32)
    config = json.loads((FIXTURE / "config.json").read_text())
    component = write_component(tmp_path / "c", config, weights)
    with pytest.raises(FormatError) as e:
        TurboVAEDDecoder(component)
    assert "missing: up_blocks.1.resnets.0.conv2.conv.bias" in str(e.value)
    assert "unexpected: norm_out.running_mean" in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"timestep_conditioning": True}, "timestep_conditioning=True is not supported"),
    ({"upsample_factor": [1, 2, 2, 2]}, "upsample_factor"),
    ({"patch_size": 8}, "patch_size 8"),
    ({"decoder_layers_per_block": [1, 1, 1, 1]}, "one entry more"),
    ({"_class_name": "AutoencoderKLLTXVideo"}, "not a AutoencoderKLTurboVAED config"),
])
def test_unsupported_configs(tmp_path, change, message):
    config = json.loads((need(FIXTURE) / "config.json").read_text()) | change
    component = write_component(tmp_path / "c", config, {"x": np.zeros(1, np.float32)})
    with pytest.raises(FormatError, match=message):
        TurboVAEDDecoder(component)


# ----------------------------------------------------------------------------- conversion

def test_convert_training_checkpoint(tmp_path):
    """torch.save'd training checkpoint {"state_dict": {"gen_model": whole model}} -> FP16."""
    torch = pytest.importorskip("torch")
    weights = load_file(need(FIXTURE) / WEIGHTS)
    model = {f"decoder.{k}": torch.from_numpy(v) for k, v in weights.items()}
    model |= {"latents_mean": torch.zeros(8), "latents_std": torch.ones(8),
              "aligned_feature_projection_heads.0.0.conv.weight": torch.zeros(32, 16, 1, 1, 1)}
    torch.save({"epoch": 3, "state_dict": {"gen_model": model, "dics_model": {}}},
               tmp_path / "ckpt.pth")
    result = CliRunner().invoke(cli, ["convert", "--from", "turbo-vaed", str(tmp_path / "ckpt.pth"),
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "dropped 3 tensors" in result.output
    component = Component(tmp_path / "out")
    assert component.storage_dtypes() == {"F16"} and set(component) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(component[name], value.astype(np.float16))
    fixture_config = json.loads((FIXTURE / "config.json").read_text())
    assert component.config["_class_name"] == CLASS_NAME
    assert architecture(component.config) == architecture(fixture_config)
    TurboVAEDDecoder(component)                               # loads and checks


def test_convert_decoder_state_dict_float32_decodes_like_the_fixture(tmp_path):
    torch = pytest.importorskip("torch")
    weights = load_file(need(FIXTURE) / WEIGHTS)
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "decoder.pth")
    convert_turbo_vaed(tmp_path / "decoder.pth", tmp_path / "out", dtype="float32",
                       log=lambda m: None)
    decoder = TurboVAEDDecoder(Component(tmp_path / "out"))
    got = decoder.decode(np.load(FIXTURE / "video_latent.npy"))
    assert np.abs(got - np.load(FIXTURE / "video_decoded.npy")).max() <= 5e-4


def test_convert_safetensors_with_config_override(tmp_path):
    source = need(FIXTURE) / WEIGHTS
    (tmp_path / "override.json").write_text(json.dumps({"scaling_factor": 0.5}))
    result = CliRunner().invoke(cli, ["convert", "--from", "turbo-vaed", "--config",
                                      str(tmp_path / "override.json"), str(source),
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert Component(tmp_path / "out").config["scaling_factor"] == 0.5
    # an override that contradicts the weights is caught, naming the tensors
    (tmp_path / "bad.json").write_text(json.dumps({"decoder_layers_per_block": [1, 1, 1, 1, 2]}))
    with pytest.raises(FormatError, match="missing: mid_block.resnets.1"):
        convert_turbo_vaed(source, tmp_path / "out2", config_path=tmp_path / "bad.json",
                           log=lambda m: None)


def test_convert_reports_missing_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    weights = load_file(need(FIXTURE) / WEIGHTS)
    del weights["upsampler2d_2.conv.bias"], weights["mid_block.resnets.0.conv2.pointwise_conv.bias"]
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "partial.pth")
    with pytest.raises(FormatError) as e:
        convert_turbo_vaed(tmp_path / "partial.pth", tmp_path / "out", log=lambda m: None)
    assert ("missing: mid_block.resnets.0.conv2.pointwise_conv.bias, upsampler2d_2.conv.bias"
            in str(e.value))
    assert not (tmp_path / "out").exists()


def test_convert_folder_to_float16(tmp_path):
    source = Component(need(LTX_FIXTURE))
    result = CliRunner().invoke(cli, ["convert", "--from", "folder", str(LTX_FIXTURE),
                                      str(tmp_path / "vae")])
    assert result.exit_code == 0, result.output
    converted = Component(tmp_path / "vae")
    assert source.storage_dtypes() == {"F32"} and converted.storage_dtypes() == {"F16"}
    assert list(converted) == list(source)
    for name in source:
        np.testing.assert_array_equal(converted[name], source[name].astype(np.float16))
    assert converted.config == source.config | {"_tinyi2v_format_version": 1}


def test_convert_folder_refuses_a_model_folder_and_config_option(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    result = CliRunner().invoke(cli, ["convert", "--from", "folder", str(tmp_path / "model"),
                                      str(tmp_path / "out")])
    assert result.exit_code == 1 and "a model folder" in result.output
    result = CliRunner().invoke(cli, ["convert", "--from", "folder", "--config",
                                      str(tmp_path / "model" / "model_index.json"),
                                      str(tmp_path / "model"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "--config applies to --from turbo-vaed only" in result.output
