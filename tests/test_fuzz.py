"""Fuzzing of the readers of untrusted files (short CI run; the long run is benchmarks/fuzz.py),
and one regression test for each bug the fuzzer found.

The cases are benchmarks/fuzz.py's: hypothesis supplies the `random.Random` that drives each
corruption, derandomized so every CI run tries the same cases. A case fails when anything but a
one-line TinyI2VError naming the file escapes, when it runs over the time limit, or when its
traced allocations exceed benchmarks.fuzz.CASE_PEAK_BYTES.
"""
from __future__ import annotations

import io
import json
import random
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import fuzz
from tinyi2v import Pipeline
from tinyi2v.errors import FormatError
from tinyi2v.io.checkpoint import load_checkpoint
from tinyi2v.io.safetensors import SafetensorsFile, save_file
from tinyi2v.weights import read_json

EXAMPLES = {"safetensors": 300, "checkpoint": 60, "model": 80}   # a few seconds each on 2 cores


@pytest.fixture(scope="module", params=list(fuzz.TARGETS))
def target(request, tmp_path_factory):
    return fuzz.TARGETS[request.param](tmp_path_factory.mktemp(request.param))


def test_fuzz_target(target):
    @settings(max_examples=EXAMPLES[target.name], derandomize=True, deadline=None,
              database=None, suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def case(rnd: random.Random) -> None:
        fuzz.run_case(target, rnd)

    case()


def test_the_fuzzer_can_fail(target, monkeypatch):
    """A reader that raises a plain ValueError must be caught: the check is not vacuous."""
    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(fuzz, {"safetensors": "read_safetensors", "checkpoint": "read_checkpoint",
                               "model": "load_model"}[target.name], broken)
    with pytest.raises(ValueError, match="boom"):
        fuzz.run_case(target, random.Random(0))


def test_huge_header_length_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    save_file({"x": np.zeros(4, np.float32)}, path)
    path.write_bytes((2**60).to_bytes(8, "little") + path.read_bytes()[8:])
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="header length 1152921504606846976 exceeds"):
            SafetensorsFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# --- regressions: one per bug the fuzzer found ----------------------------------------------

def test_deeply_nested_json_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000)
    with pytest.raises(FormatError, match="not a readable JSON file .RecursionError"):
        read_json(path)


def test_safetensors_dtype_that_is_not_a_string(tmp_path):
    header = json.dumps({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "list-dtype.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(FormatError, match=r"unknown or unsupported dtype \['F32'\]"):
        SafetensorsFile(path)


def _checkpoint(tmp_path, **changes: tuple[bytes, int]):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(fuzz.write_zip(fuzz.checkpoint_entries() | changes))
    return path


def test_checkpoint_byteorder_zip_bomb_is_not_inflated(tmp_path):
    bomb = (b"little" + b" " * 2**26, zipfile.ZIP_DEFLATED)     # 64 MiB in a 65 kB file
    path = _checkpoint(tmp_path, **{"archive/byteorder": bomb})
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="byteorder record is 67108870 bytes"):
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_checkpoint_messages_stay_short(tmp_path):
    long_global = b"\x80\x02c" + b"m" * 100_000 + b"\nx\n."
    path = _checkpoint(tmp_path, **{"archive/data.pkl": (long_global, zipfile.ZIP_STORED)})
    with pytest.raises(FormatError, match="refusing to load 'mmmm") as e:
        load_checkpoint(path)
    assert len(str(e.value)) < len(str(path)) + 200
    # zipfile quotes the raw name of a local header that disagrees with the directory: make
    # that name 65535 bytes long
    data = bytearray(fuzz.write_zip(fuzz.checkpoint_entries()))
    at = data.index(b"archive/data/0")                          # the local header's copy
    data[at - 4:at - 2] = b"\xff\xff"                           # its name length
    zipfile.ZipFile(io.BytesIO(data))                           # the directory is still fine
    (tmp_path / "ckpt.pth").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="malformed checkpoint .BadZipFile") as e:
        load_checkpoint(tmp_path / "ckpt.pth")
    assert "\n" not in str(e.value) and len(str(e.value)) < len(str(path)) + 300


@pytest.fixture
def model(tmp_path):
    return fuzz.seed_model(tmp_path / "model")


def _edit(path, **values):
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("file, values, match", [
    ("transformer/config.json", {"hidden_size": "72"}, "hidden_size = '72' must be an integer"),
    ("transformer/config.json", {"num_blocks": 10**12}, r"num_blocks = 10+ must be an integer in 1\.\.65536"),
    ("transformer/config.json", {"softmax_blocks": 1}, "softmax_blocks = 1 must be a list"),
    ("vae/config.json", {"layers_per_block": 1.5}, "layers_per_block = 1.5 must be a list"),
    ("vae/config.json", {"timestep_conditioning": [1]}, "must be true or false"),
    ("decoder/config.json", {"decoder_is_dw_conv": [0, 1]}, "each item true or false"),
    ("decoder/config.json", {"patch_size_t": 2**80}, "patch_size_t = 1208925819614629174706176"),
    ("decoder/config.json", {"patch_size": 3}, "decoder: Turbo-VAED config: patch_size 3"),
    ("scheduler/scheduler_config.json", {"num_inference_steps": 10**12}, "num_inference_steps"),
    ("scheduler/scheduler_config.json", {"shift": None}, "shift = None must be a finite number"),
    ("model_index.json", {"defaults": [64, 96]}, "defaults: expected a JSON object, got list"),
    ("model_index.json", {"defaults": {"height": "64"}}, "height = '64' must be an integer"),
])
def test_config_of_the_wrong_type(model, file, values, match):
    _edit(model / file, **values)
    with pytest.raises(FormatError, match=match) as e:
        Pipeline.load(model)
    assert str(model) in str(e.value)


def test_fractional_fps_default_is_accepted(model):
    _edit(model / "model_index.json", defaults={"height": 64, "width": 96, "frames": 9,
                                                "fps": 7.5, "motion": 2.0})
    assert Pipeline.load(model).defaults["fps"] == 7.5


def test_missing_config_key(model):
    config = json.loads((model / "transformer/config.json").read_text())
    del config["freq_dim"]
    (model / "transformer/config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="transformer: config has no 'freq_dim'"):
        Pipeline.load(model)


def test_safetensors_messages_cut_long_header_values(tmp_path):
    header = json.dumps({"n" * 5000: {"dtype": "F32", "shape": "A" * 10_000,
                                      "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "long.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(FormatError, match="shape 'AAAA.* is not a list") as e:
        SafetensorsFile(path)
    assert len(str(e.value)) < len(str(path)) + 300


@pytest.mark.parametrize("file, values", [
    ("transformer/config.json", {"_class_name": "A" * 10_000}),
    ("vae/config.json", {"_class_name": "A" * 10_000}),
    ("vae/config.json", {"upsample_factor": list(range(1000))}),
    ("decoder/config.json", {"upsample_factor": list(range(1000))}),
])
def test_config_messages_cut_long_values(model, file, values):
    _edit(model / file, **values)
    with pytest.raises(FormatError) as e:
        Pipeline.load(model)
    assert str(model) in str(e.value) and len(str(e.value)) < len(str(model)) + 400
