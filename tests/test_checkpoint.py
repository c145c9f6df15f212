"""Tests for tinyi2v.io.checkpoint: torch.save zip checkpoints read without torch.

torch is only used here to write files (and as the reference reader); the hostile and malformed
files are assembled by hand, so those tests run without torch.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tinyi2v.errors import FormatError
from tinyi2v.io import checkpoint
from tinyi2v.io.checkpoint import load_checkpoint, state_dict_from_checkpoint

from conftest import OFFICIAL, need

FIXTURE = OFFICIAL / "mobiledit-tiny-random.pth"


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _expected(t) -> np.ndarray:
    """What we return for a torch tensor: bfloat16 widened to float32, else the same dtype."""
    import torch

    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# --- a tiny pickle assembler, for files torch would never write ----------------------------


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _ints(xs: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(x) for x in xs) + b"t"


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _pid(key: str, numel: int, stype: bytes = _global("torch", "FloatStorage")) -> bytes:
    """A ('storage', type, key, 'cpu', numel) persistent id, loaded with BINPERSID."""
    return b"(" + _str("storage") + stype + _str(key) + _str("cpu") + _int(numel) + b"tQ"


def _tensor_ops(key: str, numel: int, offset: int, size: tuple, stride: tuple,
                stype: str = "FloatStorage") -> bytes:
    """Opcodes for the value torch writes for one tensor (_rebuild_tensor_v2 over a storage)."""
    hooks = _global("collections", "OrderedDict") + b")R"
    args = (b"(" + _pid(key, numel, _global("torch", stype)) + _int(offset) + _ints(size)
            + _ints(stride) + b"\x89" + hooks + b"t")
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _call(module: str, name: str, args: bytes) -> bytes:
    """Opcodes calling module.name with the (already encoded) argument items."""
    return _global(module, name) + b"(" + args + b"tR"


def _dict_pickle(**values: bytes) -> bytes:
    """A protocol-2 pickle of {name: value} where each value is given as opcodes."""
    items = b"".join(_str(k) + v for k, v in values.items())
    return b"\x80\x02}(" + items + b"u."


def _write_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, *,
               byteorder: str = "little", compression: int = zipfile.ZIP_STORED) -> Path:
    """A checkpoint laid out as torch.save lays it out."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def _f32(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


def _load_tensor(tmp_path: Path, size: tuple, stride: tuple, offset: int = 0,
                 storage: bytes | None = None, numel: int | None = None) -> np.ndarray:
    """Load one float32 tensor view over `storage` (default: the 12 floats 0..11)."""
    storage = _f32(*range(12)) if storage is None else storage
    numel = len(storage) // 4 if numel is None else numel
    pkl = _dict_pickle(w=_tensor_ops("0", numel, offset, size, stride))
    return load_checkpoint(_write_zip(tmp_path / "t.pth", pkl, {"0": storage}))["w"]


# --- 1. the official-layout fixture ----------------------------------------------------------


def test_fixture_matches_torch_load(torch):
    sd = state_dict_from_checkpoint(load_checkpoint(need(FIXTURE)))
    ref = torch.load(FIXTURE, weights_only=True)["state_dict"]
    assert len(sd) == 199
    assert list(sd) == list(ref)
    for name, tensor in ref.items():
        expected = tensor.numpy()
        assert sd[name].dtype == expected.dtype and sd[name].shape == expected.shape, name
        np.testing.assert_array_equal(sd[name], expected, err_msg=name)


# --- 2. round trips through torch.save -------------------------------------------------------


def test_dtypes_round_trip(torch, tmp_path):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 100
    tensors = {
        "f32": x,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "f64": x.double(),
        "i64": torch.arange(-7, 8),
        "i32": torch.arange(-7, 8, dtype=torch.int32),
        "i16": torch.arange(-7, 8, dtype=torch.int16),
        "i8": torch.arange(-7, 8, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "scalar_int": torch.tensor(7),
        "empty": torch.zeros(0, 4),
    }
    torch.save(tensors, tmp_path / "d.pt")
    got = load_checkpoint(tmp_path / "d.pt")
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        want = _expected(t)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert got["bf16"].dtype == np.float32 and got["scalar"].shape == ()


def test_views_sharing_a_storage(torch, tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {
        "base": base,
        "transposed": base.t(),
        "slice": base[1:3, 2:5],  # offset 8, shares base's storage
        "strided": base[::2, ::3],
        "row": base[2],
        "element": base[3, 4],  # 0-d with an offset
    }
    torch.save(views, tmp_path / "v.pt")
    got = load_checkpoint(tmp_path / "v.pt")
    for name, t in views.items():
        np.testing.assert_array_equal(got[name], t.numpy(), err_msg=name)
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name


def test_parameter_containers_and_plain_values(torch, tmp_path):
    w = torch.randn(2, 3)
    obj = {
        "model": collections.OrderedDict(
            weight=torch.nn.Parameter(w), frozen=torch.nn.Parameter(w, requires_grad=False)
        ),
        "nested": {"list": [w, (w[0], 3)], "deep": {"deeper": {"x": torch.ones(1)}}},
        "epoch": 12,
        "lr": 1e-4,
        "name": "run-1",
        "flag": True,
        "nothing": None,
    }
    torch.save(obj, tmp_path / "c.pt")
    got = load_checkpoint(tmp_path / "c.pt")
    assert isinstance(got["model"], collections.OrderedDict)
    np.testing.assert_array_equal(got["model"]["weight"], w.numpy())
    np.testing.assert_array_equal(got["model"]["frozen"], w.numpy())
    nested = got["nested"]
    assert isinstance(nested["list"], list) and isinstance(nested["list"][1], tuple)
    np.testing.assert_array_equal(nested["list"][1][0], w[0].numpy())
    assert nested["list"][1][1] == 3
    np.testing.assert_array_equal(nested["deep"]["deeper"]["x"], [1.0])
    plain = [got[k] for k in ("epoch", "lr", "name", "flag", "nothing")]
    assert plain == [12, 1e-4, "run-1", True, None]
    assert list(state_dict_from_checkpoint(got)) == ["weight", "frozen"]


def test_module_state_dict_with_metadata(torch, tmp_path):
    # Module.state_dict() carries a `_metadata` attribute, which torch.save writes with BUILD.
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    sd = state_dict_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    ref = net.state_dict()
    assert list(sd) == list(ref)
    for name, t in ref.items():
        np.testing.assert_array_equal(sd[name], t.numpy())


def test_big_endian_storage(tmp_path):
    values = np.arange(6, dtype=np.float32) - 2.5
    pkl = _dict_pickle(w=_tensor_ops("0", 6, 0, (2, 3), (3, 1)))
    storages = {"0": values.astype(">f4").tobytes()}
    got = load_checkpoint(_write_zip(tmp_path / "be.pth", pkl, storages, byteorder="big"))["w"]
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, values.reshape(2, 3))


# --- 3. hostile pickles ----------------------------------------------------------------------


class _Call:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint would contain."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, _Call]:
    create = f"open({str(marker)!r}, 'w').close()"
    return {
        "posix.system": _Call(os.system, f"touch '{marker}'"),
        "builtins.exec": _Call(exec, create),
        "builtins.eval": _Call(eval, create),
        "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize(
    "name", ["posix.system", "builtins.exec", "builtins.eval", "subprocess.Popen"]
)
@pytest.mark.parametrize("hidden", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL, and STACK_GLOBAL with framing
def test_code_execution_is_refused(tmp_path, name, hidden, protocol):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    obj = {"state_dict": {"w": 1.0, "x": {"y": [payload]}}} if hidden else payload
    # fix_imports=False keeps Python 3 module names (else protocol 2 writes __builtin__.exec).
    pkl = pickle.dumps(obj, protocol=protocol, fix_imports=False)
    with pytest.raises(FormatError, match=f"refusing to load '{name}'"):
        load_checkpoint(_write_zip(tmp_path / "evil.pth", pkl))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["posix.system", "builtins.exec"])
def test_payloads_are_live_under_plain_pickle(tmp_path, name):
    # Control for the test above: the same bytes do run code when given to plain pickle.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_payloads(marker)[name], protocol=2, fix_imports=False))
    assert marker.exists()


_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = _global("torch", "FloatStorage")


@pytest.mark.parametrize(
    "pkl, match",
    [
        pytest.param(
            _dict_pickle(w=_call("torch", "load", _str("x.pth"))),
            "refusing to load 'torch.load'",
            id="torch.load",
        ),
        pytest.param(
            _dict_pickle(w=_call(*_REBUILD, _str("x"))),
            r"bad call of torch._utils._rebuild_tensor_v2: .*argument",
            id="rebuild-wrong-arity",
        ),
        pytest.param(
            _dict_pickle(w=_call(*_REBUILD, _str("x") + _int(0) + _ints((1,)) * 2 + b"\x89N")),
            "tensor storage is a str, not a storage",
            id="rebuild-not-a-storage",
        ),
        pytest.param(
            _dict_pickle(w=_call("torch._utils", "_rebuild_parameter", _str("x") + b"\x89N")),
            "nn.Parameter wraps a str",
            id="parameter-not-a-tensor",
        ),
        pytest.param(
            _dict_pickle(w=_call("collections", "OrderedDict", _int(5))),
            "bad call of collections.OrderedDict",
            id="ordereddict-bad-args",
        ),
        pytest.param(
            _dict_pickle(w=_FLOAT_STORAGE + b")R"), "not callable", id="call-a-storage-type"
        ),
        pytest.param(
            _dict_pickle(w=_FLOAT_STORAGE), "unexpected _StorageType", id="bare-storage-type"
        ),
        pytest.param(
            _dict_pickle(w=_global(*_REBUILD) + b"}b"), "BUILD on _Global", id="build-on-global"
        ),
        pytest.param(
            _dict_pickle(w=_global(*_REBUILD) + b"N}" + _str("fn") + b"Ns\x86b"),
            "BUILD on _Global",
            id="build-slots-on-global",
        ),
        pytest.param(_dict_pickle(w=_str("x") + b"Q"), "persistent id", id="string-pid"),
        pytest.param(
            _dict_pickle(w=_pid("0", 1, stype=_str("FloatStorage"))),
            "not a storage type",
            id="pid-with-fake-storage-type",
        ),
        pytest.param(_dict_pickle(w=_pid("0", 1)), "unexpected _Storage", id="bare-storage"),
        pytest.param(
            _dict_pickle(w=_tensor_ops("0", 1, 0, (1,), (1,), stype="ComplexFloatStorage")),
            "refusing to load 'torch.ComplexFloatStorage'",
            id="complex-storage",
        ),
        pytest.param(
            _dict_pickle(w=_global("torch.storage", "UntypedStorage")),
            "refusing to load 'torch.storage.UntypedStorage'",
            id="untyped-storage",
        ),
        pytest.param(b"\x80\x02\x82\x01.", "opcode EXT1", id="ext1-copyreg-registry"),
        pytest.param(
            b"\x80\x02" + _global("collections", "OrderedDict") + b")\x81.",
            "opcode NEWOBJ",
            id="newobj",
        ),
        pytest.param(b"\x80\x02(ccollections\nOrderedDict\no.", "opcode OBJ", id="obj"),
        pytest.param(  # the C unpickler would allocate and zero a 32 GiB memo table
            b"\x80\x02Nr\xff\xff\xff\x7f.",
            "memo index 2147483647 out of sequence",
            id="huge-memo-index",
        ),
        pytest.param(b"\x80\x02h\x05.", "memo index 5 was never stored", id="memo-get-missing"),
    ],
)
def test_misuse_is_format_error(tmp_path, pkl, match):
    path = _write_zip(tmp_path / "bad.pth", pkl, {"0": _f32(1.0)})
    with pytest.raises(FormatError, match=match):
        load_checkpoint(path)


def test_build_cannot_patch_allowed_functions(tmp_path):
    # BUILD with slot state on an allowed global must not change how later files load.
    patch = _global(*_REBUILD) + b"N}" + _str("fn") + b"Ns\x86b0"
    with pytest.raises(FormatError):
        load_checkpoint(_write_zip(tmp_path / "p.pth", b"\x80\x02" + patch + b"N."))
    np.testing.assert_array_equal(_load_tensor(tmp_path, (2,), (1,)), [0.0, 1.0])


# --- 4. malformed files ----------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path) -> Path:
    pkl = _dict_pickle(
        a=_tensor_ops("0", 6, 0, (2, 3), (3, 1)),
        b=_tensor_ops("1", 2, 0, (2,), (1,), "LongStorage"),
        c=_tensor_ops("0", 6, 1, (2, 2), (1, 3)),
    )
    storages = {"0": _f32(*range(6)), "1": np.array([5, -5], "<i8").tobytes()}
    path = _write_zip(tmp_path / "good.pth", pkl, storages)
    got = load_checkpoint(path)
    np.testing.assert_array_equal(got["a"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(got["b"], [5, -5])
    np.testing.assert_array_equal(got["c"], [[1, 4], [2, 5]])
    return path


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(FormatError, match=r"only the zip checkpoint format \(torch.save since"):
        load_checkpoint(junk)


def test_legacy_torch_format(tmp_path, torch):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match="only the zip checkpoint format"):
        load_checkpoint(legacy)


def test_truncated_zip(tmp_path, good_file):
    data = good_file.read_bytes()
    for cut in range(0, len(data), 7):
        path = tmp_path / "cut.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            load_checkpoint(path)


def test_missing_file_is_a_format_error_naming_it(tmp_path):
    with pytest.raises(FormatError, match="absent.pth: cannot open"):
        load_checkpoint(tmp_path / "absent.pth")


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(FormatError, match="no <archive>/data.pkl"):
        load_checkpoint(path)


def test_storage_missing(tmp_path):
    pkl = _dict_pickle(w=_tensor_ops("7", 2, 0, (2,), (1,)))
    with pytest.raises(FormatError, match="storage 'data/7' is missing"):
        load_checkpoint(_write_zip(tmp_path / "s.pth", pkl, {"0": _f32(1, 2)}))


def test_storage_size_disagrees_with_numel(tmp_path):
    with pytest.raises(FormatError, match="'data/0' holds 44 bytes, expected 48"):
        _load_tensor(tmp_path, (3, 4), (4, 1), storage=_f32(*range(11)), numel=12)


@pytest.mark.parametrize(
    "size, stride, offset, match",
    [
        ((3, 5), (5, 1), 0, "reach element 14 but the storage holds 12"),
        ((3, 4), (4, 1), 1, "reach element 12"),
        ((2, 2), (1, 11), 0, "reach element 12"),
        ((1,), (1,), 12, "reach element 12"),
        ((2, -1), (1, 1), 0, "non-negative"),
        ((2, 2), (-1, 1), 2, "non-negative"),
        ((2,), (1,), -1, "storage offset -1"),
        ((2, 2), (1,), 0, "differ in length"),
        ((2**30, 2**30), (0, 0), 0, "elements from a storage of 12"),  # a 4-EiB broadcast
        ((13,), (0,), 0, "13 elements from a storage of 12"),
    ],
)
def test_tensor_outside_its_storage(tmp_path, size, stride, offset, match):
    with pytest.raises(FormatError, match=match):
        _load_tensor(tmp_path, size, stride, offset)


def test_compressed_storage_refused(tmp_path):
    pkl = _dict_pickle(w=_tensor_ops("0", 2, 0, (2,), (1,)))
    storages = {"0": _f32(1, 2)}
    path = _write_zip(tmp_path / "z.pth", pkl, storages, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match="compressed"):
        load_checkpoint(path)


def test_data_pkl_size_limit(good_file, monkeypatch):
    monkeypatch.setattr(checkpoint, "_MAX_PICKLE_BYTES", 64)
    with pytest.raises(FormatError, match="data.pkl is .* over the 64-byte limit"):
        load_checkpoint(good_file)


def test_truncated_and_corrupted_pickles(tmp_path, good_file):
    with zipfile.ZipFile(good_file) as zf:
        pkl = zf.read("archive/data.pkl")
        storages = {k: zf.read(f"archive/data/{k}") for k in ("0", "1")}
    for cut in range(len(pkl)):
        with pytest.raises(FormatError):
            load_checkpoint(_write_zip(tmp_path / "t.pth", pkl[:cut], storages))
    rng = random.Random(1)
    for _ in range(300):  # changed bytes: loading may succeed, but only FormatError may escape
        bad = bytearray(pkl)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            load_checkpoint(_write_zip(tmp_path / "f.pth", bytes(bad), storages))
        except FormatError:
            pass


def _deep_lists(n: int) -> bytes:
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


@pytest.mark.parametrize(
    "pkl",
    [
        pytest.param(_deep_lists(100_000), id="lists"),
        # A deep tuple as a dict key: hashing it would overflow the C stack and crash Python.
        pytest.param(b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"Ns.", id="tuple-key"),
        pytest.param(b"\x80\x02" + b"(" * 100_000 + b"t" * 100_000 + b".", id="marks"),
    ],
)
def test_deep_nesting(tmp_path, pkl):
    with pytest.raises(FormatError, match="nesting too deep"):
        load_checkpoint(_write_zip(tmp_path / "deep.pth", pkl))


def test_deep_nesting_built_through_the_memo(tmp_path):
    # Each new list is appended to the previous one fetched back from the memo: the opcode
    # check sees only shallow items, the walk over the result sees the real depth.
    ops = [b"\x80\x02]r" + _u32(0)]
    for i in range(1, 5000):
        ops.append(b"]r" + _u32(i) + b"0" + b"j" + _u32(i - 1) + b"j" + _u32(i) + b"a0")
    with pytest.raises(FormatError, match="nesting too deep"):
        load_checkpoint(_write_zip(tmp_path / "memo.pth", b"".join(ops) + b"."))


def test_shallow_nesting_is_fine(tmp_path):
    got = load_checkpoint(_write_zip(tmp_path / "ok.pth", _deep_lists(100)))
    for _ in range(99):
        (got,) = got
    assert got == []


# --- state_dict_from_checkpoint ------------------------------------------------------------


def test_state_dict_from_checkpoint():
    w = np.zeros(2, np.float32)
    for wrapper in ("state_dict", "model", "module"):
        assert state_dict_from_checkpoint({wrapper: {"w": w}, "epoch": 3}) == {"w": w}
    flat = state_dict_from_checkpoint(collections.OrderedDict(w=w))
    assert type(flat) is dict and flat == {"w": w}
    with pytest.raises(FormatError, match="entry 'epoch' is a int"):
        state_dict_from_checkpoint({"w": w, "epoch": 3})
    with pytest.raises(FormatError, match="key 3 is not a string"):
        state_dict_from_checkpoint({"state_dict": {3: w}})
    with pytest.raises(FormatError, match="holds a list"):
        state_dict_from_checkpoint([w])
