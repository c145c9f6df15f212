"""Checkpoint conversion and model folders."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import tinyi2v
from tinyi2v import denoiser
from tinyi2v.cli import cli
from tinyi2v.convert import convert_mobilei2v, mobilei2v_config
from tinyi2v.errors import FormatError
from tinyi2v.io.checkpoint import load_checkpoint
from tinyi2v.weights import Component, save_component

from conftest import OFFICIAL, need, random_denoiser_params

torch = pytest.importorskip("torch")


def save_checkpoint(path, state):
    """An official-layout checkpoint: torch.save({"state_dict": ...})."""
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    return path


@pytest.fixture
def tiny_state():
    cfg = denoiser.official_config(in_channels=4, hidden_size=72, num_blocks=3,
                                   softmax_blocks=(1,), mlp_hidden_size=12, freq_dim=16)
    state = random_denoiser_params(cfg)
    state["pos_embed"] = np.zeros((1, 4, 72), np.float32)          # dead entries are dropped
    state["y_embedder.y_embedding"] = np.zeros((2, 3), np.float32)
    return cfg, state


def test_architecture_is_read_from_shapes(tiny_state):
    cfg, state = tiny_state
    got = mobilei2v_config({k: v.shape for k, v in state.items()})
    assert got == cfg


def test_official_fixture_config():
    state = load_checkpoint(need(OFFICIAL / "mobiledit-tiny-random.pth"))
    cfg = mobilei2v_config({k: v.shape for k, v in state["state_dict"].items()})
    assert (cfg["hidden_size"], cfg["in_channels"], cfg["out_channels"], cfg["num_blocks"],
            cfg["softmax_blocks"], cfg["mlp_hidden_size"]) == (144, 32, 32, 16, [7, 15], 360)


def test_cli_convert_writes_fp16_folder(tiny_state, tmp_path):
    cfg, state = tiny_state
    ckpt = save_checkpoint(tmp_path / "model.pth", state)
    result = CliRunner().invoke(cli, ["convert", "--from", "mobilei2v", str(ckpt),
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    comp = Component(tmp_path / "out")
    assert comp.storage_dtypes() == {"F16"}
    assert comp.config["_tinyi2v_format_version"] == 1 and comp.config["hidden_size"] == 72
    assert "pos_embed" not in comp and len(comp) == len(denoiser.param_shapes(cfg))
    np.testing.assert_array_equal(comp["blocks.0.attn.qkv.weight"],
                                  state["blocks.0.attn.qkv.weight"].astype(np.float16))
    assert comp["blocks.0.attn.qkv.weight"].dtype == np.float32      # upcast on access


def test_convert_log_names_dropped_tensors_only_when_there_are_some(tiny_state, tmp_path):
    _, state = tiny_state
    live = {k: v for k, v in state.items() if not denoiser.is_dead_key(k)}
    for name, tensors in (("with", state), ("without", live)):
        lines = []
        convert_mobilei2v(save_checkpoint(tmp_path / f"{name}.pth", tensors), tmp_path / name,
                          log=lines.append)
        expected = ("read 51 tensors; dropped 2 unused by the forward pass (pos_embed, "
                    "y_embedder.y_embedding)" if name == "with" else "read 49 tensors")
        assert lines[0] == expected


def test_missing_and_unexpected_tensors_are_named(tiny_state, tmp_path):
    _, state = tiny_state
    del state["blocks.2.attn.proj.bias"]
    state["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    state["final_layer.linear.bias"] = np.zeros(5, np.float32)
    ckpt = save_checkpoint(tmp_path / "bad.pth", state)
    with pytest.raises(FormatError) as e:
        convert_mobilei2v(ckpt, tmp_path / "out", log=lambda m: None)
    msg = str(e.value)
    assert "missing: blocks.2.attn.proj.bias" in msg
    assert "unexpected: blocks.0.attn.extra.weight" in msg
    assert "final_layer.linear.bias (5,) != (4,)" in msg
    assert not (tmp_path / "out").exists()


def test_not_a_mobilei2v_checkpoint(tmp_path):
    ckpt = save_checkpoint(tmp_path / "other.pth", {"w": np.zeros(3, np.float32)})
    with pytest.raises(FormatError, match="not a MobileI2V denoiser checkpoint"):
        convert_mobilei2v(ckpt, tmp_path / "out", log=lambda m: None)


def test_fp16_overflow_is_refused(tiny_state, tmp_path):
    cfg, state = tiny_state
    state["x_embedder.proj.bias"][0] = 1e6
    with pytest.raises(FormatError, match="beyond the FP16 range"):
        save_component(tmp_path / "c", cfg, state)
    save_component(tmp_path / "c32", cfg, state, dtype="F32")        # float32 keeps it


def test_load_denoiser_names_mismatched_tensors(tiny_state, tmp_path):
    cfg, state = tiny_state
    del state["blocks.1.attn.qkv.bias"]
    save_component(tmp_path / "t", cfg, state)
    with pytest.raises(FormatError, match="missing: blocks.1.attn.qkv.bias"):
        tinyi2v.load_denoiser(tmp_path / "t")


def test_model_folder_and_format_version(tiny_state, tmp_path):
    cfg, state = tiny_state
    state = {k: v for k, v in state.items() if not denoiser.is_dead_key(k)}
    save_component(tmp_path / "m" / "transformer", cfg, state)
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"transformer": ["tinyi2v", "x"]}))
    assert tinyi2v.load_denoiser(tmp_path / "m").config["hidden_size"] == 72
    conf = tmp_path / "m" / "transformer" / "config.json"
    conf.write_text(json.dumps({**cfg, "_tinyi2v_format_version": 99}))
    with pytest.raises(FormatError, match="newer than this tinyi2v"):
        tinyi2v.load_denoiser(tmp_path / "m")
    with pytest.raises(FormatError, match="not a model folder"):
        tinyi2v.load_denoiser(tmp_path)


def test_existing_output_is_not_overwritten(tiny_state, tmp_path):
    cfg, state = tiny_state
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FormatError, match="already exists"):
        save_component(tmp_path / "out", cfg, state)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "tinyi2v", "convert", "--from", "mobilei2v",
                          str(bad), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith("Error:") and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
