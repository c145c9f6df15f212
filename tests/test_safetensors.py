"""Tests for tinyi2v.io.safetensors: round trips, hand-built files, rejection of bad headers,
atomic writes, and (when the official `safetensors` package is installed) a cross-check."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinyi2v.io.safetensors as stio
from tinyi2v.errors import FormatError
from tinyi2v.io.safetensors import DTYPES, SafetensorsFile, load_file, save_file

BOTH_PATHS = pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "read"])


# ---------------------------------------------------------------------------------------------
# helpers


def write_raw(path, header, data: bytes = b"", length: int | None = None) -> None:
    """Build a file by hand: header is a dict (JSON-encoded) or raw bytes; length overrides N."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + text + data)


def read_raw(path) -> tuple[dict, bytes]:
    """Parse a file without the module under test: (header, data buffer)."""
    blob = Path(path).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def bf16_reference(x: float) -> int:
    """Round one float32 to bfloat16 bits by comparing the distances to its two neighbours.

    Deliberately unlike the bit trick in the module: it works on values, in float64, where the
    differences of float32 numbers are exact.
    """
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    lo = bits >> 16  # the neighbour toward zero (truncation)
    if bits & 0xFFFF == 0:
        return lo
    hi = lo + 1  # the neighbour away from zero; 0x7F80 is infinity

    def value(b16: int) -> float:
        if b16 & 0x7FFF == 0x7F80:  # IEEE rounds as if the exponent were unbounded
            return math.copysign(2.0**128, x)
        return struct.unpack("<f", struct.pack("<I", b16 << 16))[0]

    d_lo, d_hi = abs(x - value(lo)), abs(value(hi) - x)
    if d_lo != d_hi:
        return lo if d_lo < d_hi else hi
    return lo if lo % 2 == 0 else hi


def f32_from_bits(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


MIXED = {
    "f64": np.linspace(-1, 1, 7),
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "f16": np.array([[0.5, -2.0, 65504.0], [np.inf, np.nan, 1e-7]], dtype=np.float16),
    "i64": np.array([-(2**63), 2**63 - 1, 0]),
    "i32": np.array([-5, 7], dtype=np.int32),
    "i16": np.array([[-300]], dtype=np.int16),
    "i8": np.array([-128, 127], dtype=np.int8),
    "u8": np.array([0, 255, 3], dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "scalar": np.array(2.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "empty_i64": np.zeros((4, 0), dtype=np.int64),
}


@pytest.fixture
def good_file(tmp_path):
    """A small valid file with two F32 tensors: 'a' at [0, 8) and 'b' at [8, 24)."""
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones(2, np.float32), "b": np.zeros(4, np.float32)}, path)
    return path


# ---------------------------------------------------------------------------------------------
# round trips


@BOTH_PATHS
def test_round_trip_all_dtypes(tmp_path, use_mmap):
    path = tmp_path / "mixed.safetensors"
    save_file(MIXED, path, metadata={"format": "np", "note": "ünïcode"})
    loaded = load_file(path, use_mmap=use_mmap)
    assert list(loaded) == list(MIXED)
    for name, arr in MIXED.items():
        assert_same(loaded[name], arr)
        assert loaded[name].flags.writeable and loaded[name].flags.c_contiguous
    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        assert f.metadata == {"format": "np", "note": "ünïcode"}
        assert len(f) == len(MIXED) and list(f.keys()) == list(MIXED)
        assert "f32" in f and "nope" not in f
        assert f.dtype_of("f16") == "F16" and f.dtype_of("bool") == "BOOL"
        assert f.shape_of("scalar") == () and f.shape_of("empty") == (0, 3)
        assert f.nbytes_of("i64") == 24 and f.nbytes_of("empty") == 0
        for name, arr in MIXED.items():
            assert_same(f[name], arr)
        with pytest.raises(KeyError):
            f["nope"]


def test_mmap_views_and_read_copies(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(MIXED, path)
    mapped, read = SafetensorsFile(path, use_mmap=True), SafetensorsFile(path, use_mmap=False)
    with mapped, read:
        for name in MIXED:
            view, fresh = mapped[name], read[name]
            assert_same(view, fresh)
            # The writer puts wide dtypes first, so every tensor is aligned and zero-copy.
            assert not view.flags.writeable and view.flags.aligned
            assert fresh.flags.writeable and fresh.flags.aligned


def test_header_and_layout(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(MIXED, path, metadata={"k": "v"})
    header, data = read_raw(path)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0  # data buffer starts 8-byte aligned
    assert header.pop("__metadata__") == {"k": "v"}
    assert list(header) == list(MIXED)  # the header keeps insertion order
    ranges = sorted(tuple(e["data_offsets"]) for e in header.values())
    ends = [0] + [end for _, end in ranges]
    assert [begin for begin, _ in ranges] == ends[:-1] and ends[-1] == len(data)  # no holes
    for e in header.values():
        assert e["data_offsets"][0] % DTYPES[e["dtype"]].itemsize == 0


def test_no_metadata_means_empty_dict(good_file):
    assert "__metadata__" not in read_raw(good_file)[0]
    with SafetensorsFile(good_file) as f:
        assert f.metadata == {}


def test_big_endian_and_non_contiguous_inputs(tmp_path):
    path = tmp_path / "m.safetensors"
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[::2, ::3].T
    save_file({"big": big, "strided": strided}, path)
    header, data = read_raw(path)
    assert header["big"]["dtype"] == "I32"
    begin, end = header["big"]["data_offsets"]
    assert data[begin:end] == np.arange(6, dtype="<i4").tobytes()
    loaded = load_file(path)
    assert np.array_equal(loaded["big"], big) and loaded["big"].dtype == np.int32
    assert np.array_equal(loaded["strided"], strided)


def test_empty_file_of_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({}, path, metadata={"only": "metadata"})
    with SafetensorsFile(path) as f:
        assert len(f) == 0 and f.metadata == {"only": "metadata"}


def test_env_var_forces_read_path(good_file, monkeypatch):
    monkeypatch.delenv("TINYI2V_NO_MMAP", raising=False)
    with SafetensorsFile(good_file) as f:
        assert not f["a"].flags.writeable  # default on CPython: an mmap view
    monkeypatch.setenv("TINYI2V_NO_MMAP", "1")
    with SafetensorsFile(good_file) as f:
        assert f["a"].flags.writeable  # read path: a fresh array


def test_views_outlive_close(good_file):
    f = SafetensorsFile(good_file, use_mmap=True)
    view = f["a"]
    f.close()
    assert np.array_equal(view, [1, 1])  # the mapping lives as long as a view of it
    with pytest.raises(ValueError, match="closed"):
        f["a"]
    with SafetensorsFile(good_file, use_mmap=False) as g:
        pass
    with pytest.raises(ValueError, match="closed"):
        g["a"]


def test_replacing_a_mapped_file_keeps_old_views(good_file):
    with SafetensorsFile(good_file, use_mmap=True) as f:
        old = f["a"]
        save_file({"a": np.full(2, 7, np.float32)}, good_file)
        assert np.array_equal(old, [1, 1])
    assert np.array_equal(load_file(good_file)["a"], [7, 7])


# ---------------------------------------------------------------------------------------------
# dtype conversion on save


BF16_CASES = f32_from_bits(
    0x3F800000,  # 1.0: exact
    0x3F808000,  # 1 + 2**-8: tie, rounds down to even 0x3F80
    0x3F818000,  # tie, rounds up to even 0x3F82
    0x3F808001,  # just above a tie: up
    0x3F807FFF,  # just below a tie: down
    0x7F7FFFFF,  # largest float32: rounds to infinity
    0x7F7F7FFF,  # stays the largest finite bfloat16
    0xFF7FFFFF,  # most negative float32: -infinity
    0x80000000,  # -0.0
    0x00000001,  # smallest subnormal: rounds to +0
    0x00008000,  # subnormal tie: to even (0)
    0x00018000,  # subnormal tie: to even (2)
    0x7F800000,  # inf
    0xFF800000,  # -inf
)
NANS = f32_from_bits(0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF, 0x7F80FFFF)


@BOTH_PATHS
def test_bf16_rounding(tmp_path, use_mmap):
    path = tmp_path / "bf16.safetensors"
    x = np.concatenate([BF16_CASES, NANS, np.linspace(-3, 3, 101, dtype=np.float32)])
    save_file({"x": x, "ints": np.arange(3)}, path, dtype="BF16")
    expected = [bf16_reference(float(v)) for v in x[~np.isnan(x)]]
    header, data = read_raw(path)
    assert header["x"]["dtype"] == "BF16" and header["ints"]["dtype"] == "I64"
    begin, end = header["x"]["data_offsets"]
    stored = np.frombuffer(data[begin:end], "<u2")
    assert stored[~np.isnan(x)].tolist() == expected
    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        assert f.dtype_of("x") == "BF16" and f.nbytes_of("x") == 2 * x.size
        back = f["x"]
        assert back.dtype == np.float32 and back.shape == x.shape
        # Read back exactly: the stored bits in the top half of a float32. NaN stays NaN.
        assert np.array_equal(back.view(np.uint32), stored.astype(np.uint32) << 16)
        assert np.isnan(back).tolist() == np.isnan(x).tolist()
        assert_same(f["ints"], np.arange(3))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=20))
def test_bf16_rounding_property(values):
    x = np.array(values, dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        save_file({"x": x}, path, dtype="BF16")
        back = load_file(path)["x"]
    assert (back.view(np.uint32) >> 16).tolist() == [bf16_reference(float(v)) for v in x]


def test_bf16_scalar_and_empty(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"s": np.array(3.5, np.float32), "e": np.zeros((2, 0))}, path, dtype="BF16")
    loaded = load_file(path)
    assert_same(loaded["s"], np.array(3.5, np.float32))
    assert_same(loaded["e"], np.zeros((2, 0), np.float32))


def test_cast_to_f16_and_f32_leaves_integers(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"w": np.array([0.1, 300.7]), "n": np.array([1, 2], np.int32), "m": np.array([True])}
    save_file(tensors, path, dtype="F16")
    with SafetensorsFile(path) as f:
        assert [f.dtype_of(k) for k in f] == ["F16", "I32", "BOOL"]
        assert_same(f["w"], np.array([0.1, 300.7]).astype(np.float16))
    save_file({"h": np.array([0.5], np.float16)}, path, dtype="F32")
    assert_same(load_file(path)["h"], np.array([0.5], np.float32))


# ---------------------------------------------------------------------------------------------
# property test


SUPPORTED = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8,
             np.bool_]


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(max_size=8).filter(lambda s: s != "__metadata__"),
                          max_size=5, unique=True))
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    return {
        name: draw(hnp.arrays(st.sampled_from(SUPPORTED), shapes)) for name in names
    }


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_dicts(),
       metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_round_trip_property(tensors, metadata):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        save_file(tensors, path, metadata=metadata)
        by_read = load_file(path, use_mmap=False)
        with SafetensorsFile(path, use_mmap=True) as f:
            assert f.metadata == metadata
            assert list(f) == list(tensors)
            for name, arr in tensors.items():
                assert_same(f[name], arr)
                assert_same(by_read[name], arr)


# ---------------------------------------------------------------------------------------------
# hand-built files


@BOTH_PATHS
def test_misaligned_tensor_is_copied(tmp_path, use_mmap):
    path = tmp_path / "odd.safetensors"
    x = np.array([1.5, -2.25, 3e-3], dtype=np.float32)
    header = {
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # buffer 8-aligned, so 'x' starts at an odd file offset
    write_raw(path, text, b"\x09" + x.tobytes())
    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        got = f["x"]
        assert_same(got, x)
        assert got.flags.aligned and got.flags.writeable  # an aligned copy, not a view
        assert_same(f["pad"], np.array([9], np.uint8))


def test_official_style_null_metadata_and_zero_size_at_boundary(tmp_path):
    path = tmp_path / "m.safetensors"
    header = {
        "__metadata__": None,
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]},
    }
    write_raw(path, header, np.array([42], "<i4").tobytes())
    with SafetensorsFile(path) as f:
        assert f.metadata == {} and list(f) == ["e", "a"]
        assert_same(f["a"], np.array([42], np.int32))
        assert_same(f["e"], np.zeros(0, np.float32))


# ---------------------------------------------------------------------------------------------
# rejection


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "overlap": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, 12, "overlap 'a'"),
    "hole": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, 20, "hole"),
    "hole_at_start": ({"a": entry(offsets=(4, 12))}, 12, "hole"),
    "trailing": ({"a": entry()}, 12, "4 trailing bytes"),
    "unknown_dtype": ({"a": entry(dtype="Q4")}, 8, "unknown or unsupported dtype 'Q4'"),
    "wrong_length": ({"a": entry(shape=(3,))}, 8, "needs 12"),
    "negative_shape": ({"a": entry(shape=(-2,))}, 8, "non-negative integers"),
    "float_shape": ({"a": entry(shape=(2.0,))}, 8, "non-negative integers"),
    "bool_shape": ({"a": entry(shape=(True, 2))}, 8, "non-negative integers"),
    "shape_not_list": ({"a": {**entry(), "shape": 2}}, 8, "non-negative integers"),
    "overflowing_shape": ({"a": entry(shape=(2**62, 2**62))}, 8, "needs"),
    "offsets_reversed": ({"a": entry(offsets=(8, 0))}, 8, "data_offsets"),
    "offsets_negative": ({"a": entry(offsets=(-8, 0))}, 8, "data_offsets"),
    "offsets_three": ({"a": entry(offsets=(0, 4, 8))}, 8, "data_offsets"),
    "offsets_strings": ({"a": entry(offsets=("0", "8"))}, 8, "data_offsets"),
    "offsets_past_end": ({"a": entry(offsets=(0, 8))}, 4, "past the data buffer"),
    "entry_not_object": ({"a": [1, 2]}, 0, "exactly dtype, shape, data_offsets"),
    "entry_missing_key": ({"a": {"dtype": "F32", "shape": [0]}}, 0, "exactly dtype"),
    "entry_extra_key": ({"a": {**entry(), "x": 1}}, 8, "exactly dtype"),
    "metadata_list": ({"__metadata__": ["a"]}, 0, "__metadata__"),
    "metadata_int_value": ({"__metadata__": {"a": 1}}, 0, "__metadata__"),
    "metadata_string": ({"__metadata__": "x"}, 0, "__metadata__"),
    "json_list": ([], 0, "JSON list, expected an object"),
    "json_number": (3, 0, "JSON int, expected an object"),
}


@BOTH_PATHS
@pytest.mark.parametrize("case", BAD_HEADERS, ids=str)
def test_bad_header_rejected(tmp_path, case, use_mmap):
    header, data_len, message = BAD_HEADERS[case]
    path = tmp_path / "model.safetensors"
    write_raw(path, header, bytes(data_len))
    with pytest.raises(FormatError, match="model.safetensors: ") as info:
        SafetensorsFile(path, use_mmap=use_mmap)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@BOTH_PATHS
@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b'{"a": "\xff"}', "not valid UTF-8 JSON"),
        (b"[" * 100_000, "not valid UTF-8 JSON"),  # nesting too deep for the parser
        (b"", "not valid UTF-8 JSON"),
    ],
    ids=["syntax", "utf8", "deep", "empty"],
)
def test_non_json_header_rejected(tmp_path, raw, message, use_mmap):
    path = tmp_path / "model.safetensors"
    write_raw(path, raw)
    with pytest.raises(FormatError, match=message):
        SafetensorsFile(path, use_mmap=use_mmap)


@BOTH_PATHS
@pytest.mark.parametrize(
    "cut, message",
    [
        (3, "too short for the 8-byte header length"),
        (0, "too short"),
        (8 + 5, "runs past the end of the file"),  # cut inside the header
        (-3, "past the data buffer"),  # cut inside the data
    ],
    ids=["in_length", "empty", "in_header", "in_data"],
)
def test_truncated_file_rejected(good_file, cut, message, use_mmap):
    blob = good_file.read_bytes()
    good_file.write_bytes(blob[:cut])
    with pytest.raises(FormatError, match=message):
        SafetensorsFile(good_file, use_mmap=use_mmap)


def test_header_length_past_eof(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, b"{}", length=1000)
    with pytest.raises(FormatError, match="header length 1000 runs past the end of the file"):
        SafetensorsFile(path)


def test_huge_header_length_refused_without_allocating(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, b"{}", length=2**60)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="exceeds the limit"):
            SafetensorsFile(path, use_mmap=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FormatError, match="nothere.safetensors: no such file"):
        SafetensorsFile(tmp_path / "nothere.safetensors")
    with pytest.raises(FormatError, match="no such file"):
        load_file(tmp_path / "nothere.safetensors")
    with pytest.raises(FormatError, match="cannot"):
        SafetensorsFile(tmp_path)


# ---------------------------------------------------------------------------------------------
# save_file: argument checks and atomicity


def test_save_rejects_bad_arguments(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="dtype must be"):
        save_file({"a": np.zeros(1)}, path, dtype="F64")
    with pytest.raises(FormatError, match="metadata"):
        save_file({"a": np.zeros(1)}, path, metadata={"a": 1})
    with pytest.raises(FormatError, match="invalid tensor name '__metadata__'"):
        save_file({"__metadata__": np.zeros(1)}, path)
    with pytest.raises(FormatError, match="uint16 cannot be stored"):
        save_file({"u": np.zeros(1, np.uint16)}, path)
    with pytest.raises(FormatError, match="object cannot be stored"):
        save_file({"o": np.array([None, 1], dtype=object)}, path)
    assert os.listdir(tmp_path) == []


def _fail_on_second_tensor(monkeypatch):
    real = stio._stored_bytes
    calls = []

    def flaky(arr, code):
        calls.append(code)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(arr, code)

    monkeypatch.setattr(stio, "_stored_bytes", flaky)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    _fail_on_second_tensor(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_file({"a": np.ones(3), "b": np.ones(3)}, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_existing_target(good_file, monkeypatch):
    before = good_file.read_bytes()
    monkeypatch.setattr(stio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync")))
    with pytest.raises(OSError, match="fsync"):
        save_file({"a": np.full(2, 5, np.float32)}, good_file)
    assert good_file.read_bytes() == before
    assert os.listdir(good_file.parent) == [good_file.name]


def test_failed_save_midway_keeps_existing_target(good_file, monkeypatch):
    before = good_file.read_bytes()
    _fail_on_second_tensor(monkeypatch)
    with pytest.raises(OSError):
        save_file({"x": np.ones(3), "y": np.ones(3)}, good_file)
    assert good_file.read_bytes() == before
    assert os.listdir(good_file.parent) == [good_file.name]


# ---------------------------------------------------------------------------------------------
# cross-check with the official implementation (skipped when it is not installed)


def test_official_library_agrees(tmp_path):
    official = pytest.importorskip("safetensors.numpy")
    ours_path, theirs_path = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    tensors = dict(MIXED)

    save_file(tensors, ours_path, metadata={"who": "tinyi2v"})
    theirs = official.load_file(str(ours_path))
    assert set(theirs) == set(tensors)
    for name, arr in tensors.items():
        assert_same(np.asarray(theirs[name]), arr)

    official.save_file(tensors, str(theirs_path), metadata={"who": "official"})
    with SafetensorsFile(theirs_path) as f:
        assert f.metadata == {"who": "official"}
        for name, arr in tensors.items():
            assert_same(f[name], arr)
    for name, arr in load_file(theirs_path, use_mmap=False).items():
        assert_same(arr, tensors[name])


def test_official_library_reads_our_bf16(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    # The official numpy API has no bfloat16, so compare raw bytes through its parser instead.
    if not hasattr(safetensors, "deserialize"):
        pytest.skip("this safetensors version has no deserialize()")
    path = tmp_path / "bf16.safetensors"
    x = np.concatenate([BF16_CASES, np.linspace(-3, 3, 11, dtype=np.float32)])
    save_file({"x": x}, path, dtype="BF16")
    (name, info), = safetensors.deserialize(path.read_bytes())
    assert name == "x" and info["dtype"] == "BF16" and info["shape"] == [x.size]
    stored = np.frombuffer(bytes(info["data"]), "<u2")
    assert stored.tolist() == [bf16_reference(float(v)) for v in x]


@pytest.mark.skipif(stio._mmap is None or os.environ.get("TINYI2V_NO_MMAP") == "1",
                    reason="needs mmap")
@pytest.mark.parametrize("dtype, mapped", [("F32", True), ("F16", False)])
def test_component_maps_float32_files_only(tmp_path, dtype, mapped):
    """A half-precision component is read per tensor (its pages are not kept resident), a
    float32 one is mapped (zero-copy views); both hand out the same float32 values."""
    from tinyi2v.weights import Component, save_component

    weights = {"w": (np.arange(12, dtype=np.float32).reshape(3, 4) - 5) / 4}   # exact in FP16
    save_component(tmp_path, {"_class_name": "X"}, weights, dtype=dtype)
    component = Component(tmp_path)
    assert (component.file._mm is not None) == mapped
    assert component["w"].dtype == np.float32
    np.testing.assert_array_equal(component["w"], weights["w"])
    assert Component(tmp_path, use_mmap=True).file._mm is not None  # an explicit choice wins
