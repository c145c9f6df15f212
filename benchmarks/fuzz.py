"""Fuzz the readers of untrusted files with random corruptions of valid files.

    python benchmarks/fuzz.py --cases 10000                  # the long run (docs/reliability.md)
    python benchmarks/fuzz.py --cases 200 --targets checkpoint --seed 7

Targets (each builds its own small valid input, so no fixture is needed):

    safetensors   tinyi2v.io.safetensors: open with and without mmap, read every tensor
    checkpoint    tinyi2v.io.checkpoint: load_checkpoint + state_dict_from_checkpoint
    model         a model folder: Pipeline.load (read_json, Component, load_denoiser, load_vae
                  with an LTX VAE and a Turbo-VAED decoder), then Pipeline.plan

A case is a pure function of one `random.Random`: it corrupts the valid input, runs the reader
and checks the outcome. Only tinyi2v.errors.TinyI2VError (FormatError for files) may escape, its
message one line naming the file; any other exception is a bug. Each case also runs under a time
limit and a tracemalloc peak limit (a header claiming 2^60 bytes must be refused before anything
is allocated). tests/test_fuzz.py runs the same cases through hypothesis (`st.randoms`); this
script runs each target in its own process and prints, per target: cases, unexpected exceptions
(with the case seed that reproduces each), hangs, the largest traced peak and the process's
peak RSS (VmHWM).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tinyi2v.errors import TinyI2VError

CASE_SECONDS = 10.0          # a case taking longer is a hang (the valid inputs load in ~10 ms)
CASE_PEAK_BYTES = 64 * 2**20  # traced allocations per case; the valid inputs total < 340 kB


class Hang(Exception):
    """Raised by the alarm handler when a case runs past CASE_SECONDS."""


class Unexpected(AssertionError):
    """A case broke the contract: wrong exception class, unclear message or too much memory."""


# ----------------------------------------------------------------------------- byte mutations

def flip_bits(rnd: random.Random, data: bytes, region: int | None = None) -> bytes:
    """1-8 random bit flips, within the first `region` bytes when given."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        i = rnd.randrange(min(len(out), region or len(out)))
        out[i] ^= 1 << rnd.randrange(8)
    return bytes(out)


def truncate(rnd: random.Random, data: bytes) -> bytes:
    return data[: rnd.randrange(len(data))]


def splice(rnd: random.Random, data: bytes) -> bytes:
    """Delete, insert or overwrite a random run of bytes."""
    i = rnd.randrange(len(data) + 1)
    n = rnd.choice([1, 2, 4, 8, rnd.randint(1, 256)])
    junk = rnd.choice([bytes(n), b"\xff" * n, rnd.randbytes(n)])
    how = rnd.randrange(3)
    if how == 0:
        return data[:i] + data[i + n:]
    if how == 1:
        return data[:i] + junk + data[i:]
    return data[:i] + junk + data[i + n:]


def mutate_bytes(rnd: random.Random, data: bytes, region: int | None = None) -> bytes:
    if not data:
        return rnd.randbytes(rnd.randint(0, 16))
    how = rnd.randrange(4)
    if how == 0:
        return truncate(rnd, data)
    if how == 1:
        return flip_bits(rnd, data)
    if how == 2 and region:
        return flip_bits(rnd, data, region)
    return splice(rnd, data)


# JSON values of every kind, to put where a config or header expects something else.
def odd_json(rnd: random.Random) -> object:
    return rnd.choice([
        None, True, False, 0, -1, 1, 3, 2**31, 2**40, 2**63, -(2**63), 2**80, 0.5, -2.5, 1e308,
        float("nan"), float("inf"), "", "x", "F16", [], [0], [-1], [1, 2], [2**40, 2**40],
        [True], ["a"], [None], [[1]], {}, {"a": 1}, {"a": "b"}, "A" * 10_000,
        list(range(1000)),
    ])


def deep_json(rnd: random.Random) -> str:
    n = rnd.choice([100, 1000, 10_000, 100_000])
    return rnd.choice(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])


def mutate_json_value(rnd: random.Random, value: object, depth: int = 0) -> object:
    """Replace, delete or add one entry somewhere inside a JSON object or list."""
    if isinstance(value, dict) and value and depth < 3 and rnd.random() < 0.8:
        key = rnd.choice(list(value))
        how = rnd.randrange(6)
        value = dict(value)
        if how == 0:
            del value[key]
        elif how == 1:
            value[rnd.choice(["extra", "", "__metadata__", key + "_"])] = odd_json(rnd)
        elif how <= 3:
            value[key] = mutate_json_value(rnd, value[key], depth + 1)
        else:
            value[key] = odd_json(rnd)
        return value
    if isinstance(value, list) and value and depth < 3 and rnd.random() < 0.7:
        value = list(value)
        i = rnd.randrange(len(value))
        how = rnd.randrange(4)
        if how == 0:
            del value[i]
        elif how == 1:
            value.insert(i, odd_json(rnd))
        else:
            value[i] = mutate_json_value(rnd, value[i], depth + 1)
        return value
    if isinstance(value, int) and not isinstance(value, bool) and rnd.random() < 0.5:
        return rnd.choice([value + 1, value - 1, -value, value * 2**20, 0, 2**64 - 1])
    return odd_json(rnd)


def mutate_json_text(rnd: random.Random, value: object) -> bytes:
    """A corrupted JSON file: a structural edit (most cases), or text that is not valid JSON."""
    how = rnd.randrange(10)
    text = json.dumps(value).encode()
    if how == 0:
        return deep_json(rnd).encode()
    if how == 1:
        return mutate_bytes(rnd, text)
    if how == 2:
        return rnd.choice([b"", b"\xff\xfe", b"null", b"[]", b'"x"', b"1e999", b"\x00" * 8])
    return json.dumps(mutate_json_value(rnd, value)).encode()


# ----------------------------------------------------------------------------- safetensors

def seed_safetensors(folder: Path) -> list[Path]:
    """Two valid files: every dtype the format has (zero-size and 0-d tensors included), and BF16."""
    from tinyi2v.io.safetensors import save_file

    rng = np.random.default_rng(0)
    mixed = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f16": rng.normal(size=(5,)).astype(np.float16),
        "f64": rng.normal(size=(2, 1, 2)),
        "i64": np.arange(3, dtype=np.int64),
        "i32": np.arange(2, dtype=np.int32).reshape(1, 2),
        "i16": np.arange(3, dtype=np.int16),
        "i8": np.array([-1, 2], np.int8),
        "u8": np.arange(7, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float32(2.5),
    }
    bf16 = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)),
            "n": np.arange(2, dtype=np.int64)}
    save_file(mixed, folder / "mixed.safetensors", metadata={"format": "pt"})
    save_file(bf16, folder / "bf16.safetensors", dtype="BF16")
    return [folder / "mixed.safetensors", folder / "bf16.safetensors"]


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + n]), data[8 + n:]


def mutate_header(rnd: random.Random, header: dict) -> dict:
    """One structural edit of a safetensors header aimed at the reader's checks."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    name = rnd.choice(names)
    entry = header[name]
    begin, end = entry["data_offsets"]
    other = header[rnd.choice(names)]["data_offsets"]
    how = rnd.randrange(9)
    if how == 0:
        entry["dtype"] = rnd.choice(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8",
                                     "BOOL", "F8_E4M3", "C64", "U64", "f32", "", None, 4])
    elif how == 1:
        entry["shape"] = rnd.choice([[], [0], [-1], [2**40, 2**40], [2**62], [2**64], ["3"],
                                     [1.5], [True], None, "x", [[2]], [1] * 100,
                                     [rnd.randint(0, 9) for _ in range(rnd.randint(0, 4))]])
    elif how == 2:
        entry["data_offsets"] = rnd.choice([
            [begin, end + rnd.choice([1, 8, 2**20, 2**62, 2**64])],          # past EOF
            [max(0, begin - rnd.randint(1, 16)), end],                         # overlap
            list(other), [end, begin], [-1, end], [begin], [begin, end, end], None,
            [float(begin), end], [2**64, 2**64 + end - begin], [True, end],
        ])
    elif how == 3:
        del entry[rnd.choice(list(entry))]
    elif how == 4:
        entry[rnd.choice(["extra", "dtype_"])] = odd_json(rnd)
    elif how == 5:
        header[name] = odd_json(rnd)
    elif how == 6:
        header["__metadata__"] = rnd.choice([[], {"a": 1}, "pt", None, {"a": {"b": "c"}},
                                             {"format": "pt"}, {"": ""}])
    elif how == 7:
        header[rnd.choice(["", "x" * 1000, "__metadata__ ", name + "2"])] = dict(entry)
    else:
        header = mutate_json_value(rnd, header)
    return header


def corrupt_safetensors(rnd: random.Random, data: bytes) -> bytes:
    header, buffer = _split_safetensors(data)
    n = int.from_bytes(data[:8], "little")
    how = rnd.randrange(8)
    if how == 0:  # a hostile header length: never allocate it
        claim = rnd.choice([2**60, 2**64 - 1, 2**63, 100_000_001, len(data) - 7, n + 1, n - 1,
                            rnd.randrange(2**64), 0])
        return claim.to_bytes(8, "little") + data[8:]
    if how <= 3:
        header = mutate_header(rnd, header)
        text = json.dumps(header).encode()
    elif how == 4:
        text = rnd.choice([deep_json(rnd).encode(), b"\xff\xfe{}", b"[]", b"null", b"{" * 3,
                           b'{"a":1,"a":2}', b" " * 1000, json.dumps(header).encode()[:-1]])
    else:
        return mutate_bytes(rnd, data, region=8 + n)
    length = len(text) + rnd.choice([0, 0, 0, 1, -1])
    tail = rnd.choice([buffer, buffer, buffer[:-1], buffer + b"\0", b""])
    return max(length, 0).to_bytes(8, "little") + text + tail


def read_safetensors(path: Path, use_mmap: bool) -> None:
    from tinyi2v.io.safetensors import SafetensorsFile, load_file

    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        for name in f:
            arr = f[name]
            if arr.shape != f.shape_of(name):
                raise Unexpected(f"{name}: read {arr.shape}, header says {f.shape_of(name)}")
    load_file(path, use_mmap=use_mmap)


class SafetensorsTarget:
    name = "safetensors"

    def __init__(self, workdir: Path):
        self.seeds = [p.read_bytes() for p in seed_safetensors(workdir)]
        self.path = workdir / "case.safetensors"

    def prepare(self, rnd: random.Random) -> Callable[[], None]:
        self.path.write_bytes(corrupt_safetensors(rnd, rnd.choice(self.seeds)))
        use_mmap = rnd.random() < 0.5
        return lambda: expect_error(lambda: read_safetensors(self.path, use_mmap), self.path.name)

    def cleanup(self) -> None:
        pass


# ----------------------------------------------------------------------------- checkpoint
# A pickle assembler for torch.save's format (protocol 2), so no torch is needed to make the
# valid seed, and hostile pickles can be spliced into it.

def p_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def p_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def p_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def p_tensor(key: str, stype: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    pid = p_tuple([p_str("storage"), p_global("torch", stype), p_str(key), p_str("cpu"),
                   p_int(numel)]) + b"Q"
    hooks = p_global("collections", "OrderedDict") + b")R"
    args = p_tuple([pid, p_int(offset), p_tuple([p_int(n) for n in size]),
                    p_tuple([p_int(s) for s in stride]), b"\x89", hooks])
    return p_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


# key -> (storage type, bytes); tensors -> (key, offset, size, stride)
_STORAGES = {"0": ("FloatStorage", np.arange(12, dtype="<f4").tobytes()),
             "1": ("HalfStorage", np.arange(4, dtype="<f2").tobytes()),
             "2": ("BFloat16Storage", np.array([16256, 16384], "<u2").tobytes()),
             "3": ("LongStorage", np.array([7], "<i8").tobytes()),
             "4": ("BoolStorage", bytes([1, 0, 1]))}
_ITEMSIZE = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
             "BoolStorage": 1}
_TENSORS = {"w": ("0", 0, (3, 4), (4, 1)), "w_t": ("0", 0, (4, 3), (1, 4)),
            "tail": ("0", 8, (4,), (1,)), "h": ("1", 0, (2, 2), (2, 1)),
            "bf": ("2", 0, (2,), (1,)), "step": ("3", 0, (), ()), "mask": ("4", 0, (3,), (1,))}


def tensor_ops(name: str) -> bytes:
    key, offset, size, stride = _TENSORS[name]
    stype, raw = _STORAGES[key]
    return p_tensor(key, stype, len(raw) // _ITEMSIZE[stype], offset, size, stride)


def valid_pickle() -> bytes:
    """{"state_dict": OrderedDict(tensors), "epoch": 3, "meta": [1.5, None, True, ("a", b"")]}"""
    state = p_global("collections", "OrderedDict") + b")R(" + b"".join(
        p_str(name) + tensor_ops(name) for name in _TENSORS) + b"u"
    meta = b"]q\x00(G?\xf8\x00\x00\x00\x00\x00\x00N\x88" + p_tuple([p_str("a"), b"C\x00"]) + b"e"
    return (b"\x80\x02}(" + p_str("state_dict") + state + p_str("epoch") + p_int(3)
            + p_str("meta") + meta + b"u.")


# Pickle fragments that each push one value: hostile ones the reader must refuse.
def hostile_value(rnd: random.Random) -> bytes:
    n = rnd.choice([10, 999, 1001, 5000, 100_000])
    module, name = rnd.choice([("os", "system"), ("posix", "system"), ("builtins", "eval"),
                               ("builtins", "getattr"), ("subprocess", "Popen"),
                               ("numpy.core.multiarray", "_reconstruct"), ("torch", "Tensor"),
                               ("torch._utils", "_rebuild_qtensor"), ("collections", "deque"),
                               ("torch", "FloatStorage"), ("torch._utils", "_rebuild_tensor_v2"),
                               (rnd.randbytes(4).hex(), "x")])
    size = rnd.choice([(2**31 - 1,), (2**30, 2**30), (-1,), (3, 4, 5), (1,) * 65, ()])
    stride = rnd.choice([(1,), (0,), (-1,), (2**31 - 1,), (1,) * len(size), (4, 1)])
    return rnd.choice([
        p_global(module, name) + p_tuple([p_str("echo hi")]) + b"R",     # unknown global call
        p_global(module, name),                                          # bare global
        b"(" * n + b")" + b"t" * n,                                      # deep tuples
        b"]" + b"(]" * n + b"e" * n,                                     # deep lists
        b"]q\x00h\x00a",                                                 # list containing itself
        b"}q\x00(X\x01\x00\x00\x00ah\x00u",                              # dict containing itself
        b"]r\xff\xff\xff\x7f",                                           # memo index 2^31 - 1
        b"h\x05",                                                        # memo never stored
        b"\x8b\xff\xff\xff\x7f",                                         # LONG4 claims 2 GB
        b"X\xff\xff\xff\xff",                                            # str claims 4 GB
        b"\x8d" + struct.pack("<Q", 2**60),                              # BINUNICODE8 2^60
        b"\x96" + struct.pack("<Q", 2**62),                              # BYTEARRAY8
        b"cos\nsystem\n\x85R",                                           # classic payload
        b"\x81", b"\x92", b"\x82\x01", b"P0\n", b"\x97", b"i", b"o", b"b",  # forbidden opcodes
        p_tensor("0", "FloatStorage", rnd.choice([12, 2**40, -1]), rnd.choice([0, 2**40, -3]),
                 size, stride),                                          # out-of-storage views
        p_tensor(rnd.choice(["9", "0/../1", ""]), "FloatStorage", 12, 0, (12,), (1,)),
        p_tuple([p_str("storage"), p_global("torch", "FloatStorage"), p_int(0),
                 p_str("cpu"), p_int(1)]) + b"Q",                        # storage key not a str
        p_tuple([p_str("module"), p_str("x")]) + b"Q",                   # foreign persistent id
        p_global("torch._utils", "_rebuild_parameter") + p_tuple([p_int(1), b"\x88", b")"]) + b"R",
        p_global("collections", "OrderedDict") + p_tuple([p_int(1)]) + b"R",
        p_global("torch", "FloatStorage") + b"}b",                       # BUILD on an allowed
    ])


def corrupt_pickle(rnd: random.Random, pkl: bytes) -> bytes:
    how = rnd.randrange(4)
    if how == 0:
        return mutate_bytes(rnd, pkl)
    if how == 1:  # a hostile value in place of a whole entry or tensor
        name = rnd.choice(list(_TENSORS))
        return pkl.replace(tensor_ops(name), hostile_value(rnd), 1)
    if how == 2:  # as the whole object
        return b"\x80\x02" + hostile_value(rnd) + b"."
    i = rnd.randrange(2, len(pkl))  # spliced anywhere: usually ill-formed, sometimes not
    return pkl[:i] + hostile_value(rnd) + pkl[i:]


def write_zip(entries: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, (data, compression) in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buf.getvalue()


def checkpoint_entries() -> dict[str, tuple[bytes, int]]:
    stored = zipfile.ZIP_STORED
    entries = {"archive/data.pkl": (valid_pickle(), stored),
               "archive/byteorder": (b"little", stored), "archive/version": (b"3\n", stored)}
    entries |= {f"archive/data/{k}": (raw, stored) for k, (_, raw) in _STORAGES.items()}
    return entries


def corrupt_checkpoint(rnd: random.Random) -> bytes:
    entries = checkpoint_entries()
    how = rnd.randrange(10)
    if how <= 3:
        data, c = entries["archive/data.pkl"]
        entries["archive/data.pkl"] = (corrupt_pickle(rnd, data), c)
    elif how == 4:  # a storage: resized, removed, compressed, renamed
        name = f"archive/data/{rnd.choice(list(_STORAGES))}"
        data, c = entries.pop(name)
        change = rnd.randrange(4)
        if change == 0:
            entries[name] = (mutate_bytes(rnd, data), c)
        elif change == 1:
            entries[name] = (data, zipfile.ZIP_DEFLATED)
        elif change == 2:
            entries[name + "x"] = (data, c)
    elif how == 5:  # byteorder: other values, missing, or a zip bomb
        big = (b"little" + b" " * 80 * 2**20, zipfile.ZIP_DEFLATED)  # over CASE_PEAK_BYTES
        value = rnd.choice([(b"big", 0), (b"middle", 0), (b"", 0), (rnd.randbytes(8), 0), big])
        if rnd.random() < 0.2:
            del entries["archive/byteorder"]
        else:
            entries["archive/byteorder"] = value
    elif how == 6:  # the archive layout: two pickles, none, deeper folders, a compressed bomb
        change = rnd.randrange(4)
        pkl = entries.pop("archive/data.pkl")
        if change == 0:
            entries["archive/data.pkl"], entries["other/data.pkl"] = pkl, pkl
        elif change == 1:
            entries["a/b/data.pkl"] = pkl
        elif change == 2:
            entries["archive/data.pkl"] = (pkl[0] + b"\0" * 2**24, zipfile.ZIP_DEFLATED)
    else:  # the zip itself: bytes anywhere, or in the central directory at the end
        data = write_zip(entries)
        if rnd.random() < 0.5:
            return mutate_bytes(rnd, data)
        tail = rnd.randint(1, 120)
        return data[:-tail] + flip_bits(rnd, data[-tail:])
    return write_zip(entries)


def read_checkpoint(path: Path) -> None:
    from tinyi2v.io.checkpoint import load_checkpoint, state_dict_from_checkpoint

    obj = expect_error(lambda: load_checkpoint(path), path.name)
    # state_dict_from_checkpoint sees an object, not the file: its messages cannot name it.
    expect_error(lambda: state_dict_from_checkpoint(obj), "")


class CheckpointTarget:
    name = "checkpoint"

    def __init__(self, workdir: Path):
        self.path = workdir / "case.pth"
        self.path.write_bytes(write_zip(checkpoint_entries()))
        read_checkpoint(self.path)  # the seed itself must load

    def prepare(self, rnd: random.Random) -> Callable[[], None]:
        self.path.write_bytes(corrupt_checkpoint(rnd))
        return lambda: read_checkpoint(self.path)

    def cleanup(self) -> None:
        pass


# ----------------------------------------------------------------------------- model folder

def seed_model(root: Path) -> Path:
    """A tiny complete model folder (random FP16 weights): denoiser, LTX VAE, Turbo-VAED decoder."""
    from tinyi2v import denoiser
    from tinyi2v.vae import ltx, turbo_vaed
    from tinyi2v.weights import save_component, save_model_index

    def weights(shapes: dict) -> dict:
        rng = np.random.default_rng(0)
        return {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}

    cfg = denoiser.official_config(in_channels=4, hidden_size=72, num_blocks=2, softmax_blocks=(1,),
                                   mlp_hidden_size=8, freq_dim=8)
    save_component(root / "transformer", cfg, weights(denoiser.param_shapes(cfg)))
    vae = {**ltx.official_config(), "latent_channels": 4, "block_out_channels": [4, 4, 4, 4],
           "decoder_block_out_channels": [4, 4, 4, 4], "layers_per_block": [1, 0, 0, 0, 1],
           "decoder_layers_per_block": [1, 0, 0, 0, 1]}
    save_component(root / "vae", vae, weights(ltx.param_shapes(ltx.check_config(vae, "seed"))))
    turbo = {**turbo_vaed.official_config(), "latent_channels": 4,
             "decoder_block_out_channels": [4, 4, 4, 4], "decoder_layers_per_block": [1, 1, 0, 0, 1],
             "decoder_dw_kernel_size": 3}
    save_component(root / "decoder", turbo, weights(turbo_vaed.param_shapes(turbo)))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
         "num_inference_steps": 2, "num_train_timesteps": 1000}))
    save_model_index(root, {"transformer": ["tinyi2v", "MobileI2VTransformer"],
                            "vae": ["diffusers", "AutoencoderKLLTXVideo"],
                            "decoder": ["tinyi2v", "AutoencoderKLTurboVAED"],
                            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
                     {"height": 64, "width": 96, "frames": 9, "fps": 8, "motion": 2.0})
    return root


def load_model(root: Path) -> None:
    from tinyi2v import Pipeline

    pipe = Pipeline.load(root)
    pipe.plan((64, 96))


class ModelTarget:
    name = "model"

    def __init__(self, workdir: Path):
        self.root = seed_model(workdir / "model")
        self.files = {p: p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file()}
        load_model(self.root)  # the seed itself must load

    def corrupt(self, rnd: random.Random) -> None:
        path = rnd.choice(list(self.files))
        data = self.files[path]
        how = rnd.randrange(10)
        if how == 0:  # the file is gone, empty, or a folder
            path.unlink()
            if rnd.random() < 0.3:
                path.write_bytes(b"")
            elif rnd.random() < 0.3:
                path.mkdir()
        elif how == 1:  # a second weights file beside the first
            shutil.copy(rnd.choice([p for p in self.files if p.suffix == ".safetensors"]),
                        path.parent / "extra.safetensors")
        elif path.suffix == ".json":
            path.write_bytes(mutate_json_text(rnd, json.loads(data)))
        else:  # weights: the safetensors corruptions, aimed at the header most of the time
            path.write_bytes(corrupt_safetensors(rnd, data))

    def cleanup(self) -> None:
        """Put the valid folder back."""
        for path in self.root.rglob("*"):
            if path not in self.files and path.is_file():
                path.unlink()
        for path, data in self.files.items():
            if path.is_dir():
                path.rmdir()
            path.write_bytes(data)

    def prepare(self, rnd: random.Random) -> Callable[[], None]:
        self.corrupt(rnd)
        return lambda: expect_error(lambda: load_model(self.root), self.root.name)


TARGETS: dict[str, type] = {t.name: t for t in (SafetensorsTarget, CheckpointTarget, ModelTarget)}


# ----------------------------------------------------------------------------- checking a case

def expect_error(run: Callable[[], object], where: str) -> object:
    """Run a reader and return its result: success is fine, a TinyI2VError must be one line
    naming `where`, anything else escapes (a bug)."""
    try:
        return run()
    except TinyI2VError as e:
        message = str(e)
        if "\n" in message or where not in message or len(message) > 2000:
            raise Unexpected(f"unclear message for {where}: {message[:300]!r}") from e
        return None


def _alarm(signum, frame):
    raise Hang(f"case ran over {CASE_SECONDS} s")


def run_case(target, rnd: random.Random, seconds: float = CASE_SECONDS) -> int:
    """Corrupt the target's input, then read it under a time limit (main thread only) and
    tracemalloc; return the read's traced peak in bytes. Raises Unexpected for a peak over
    CASE_PEAK_BYTES and lets other exceptions out."""
    try:
        read = target.prepare(rnd)
        return _measure(read, seconds)
    finally:
        target.cleanup()


def _measure(read: Callable[[], None], seconds: float) -> int:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    # CPU time, not wall time: a hang spins, and a busy machine must not look like one
    old = signal.signal(signal.SIGPROF, _alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        read()
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        peak = tracemalloc.get_traced_memory()[1] - before
        if started:
            tracemalloc.stop()
    if peak > CASE_PEAK_BYTES:
        raise Unexpected(f"case allocated {peak / 2**20:.0f} MiB (limit "
                         f"{CASE_PEAK_BYTES / 2**20:.0f} MiB)")
    return peak


def case_seed(seed: int, i: int) -> int:
    return seed * 1_000_003 + i


# ----------------------------------------------------------------------------- the long run

def vm_hwm() -> int | None:
    """Peak resident set of this process (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker(name: str, cases: int, seed: int) -> dict:
    """Run `cases` cases of one target in this process; a summary as a dict."""
    failures, hangs, peak = [], [], 0
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        target = TARGETS[name](Path(tmp))
        tracemalloc.start()
        start = time.perf_counter()
        for i in range(cases):
            s = case_seed(seed, i)
            try:
                peak = max(peak, run_case(target, random.Random(s)))
            except Hang:
                hangs.append(s)
            except Exception as e:  # noqa: BLE001 - recording every kind of bug is the point
                where = traceback.extract_tb(e.__traceback__)[-1]
                failures.append({"case_seed": s, "error": f"{type(e).__name__}: {str(e)[:200]}",
                                 "at": f"{Path(where.filename).name}:{where.lineno}"})
        seconds = time.perf_counter() - start
        tracemalloc.stop()
    return {"target": name, "cases": cases, "unexpected": len(failures), "hangs": len(hangs),
            "traced_peak_mib": round(peak / 2**20, 2), "vm_hwm_mib": round((vm_hwm() or 0) / 2**20),
            "seconds": round(seconds, 1), "failures": failures[:20], "hang_seeds": hangs[:20]}


def replay(name: str, s: int) -> None:
    """Re-run one case with its traceback (`--replay TARGET:CASE_SEED`)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_case(TARGETS[name](Path(tmp)), random.Random(s))
    print("case passed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--replay", metavar="TARGET:CASE_SEED")
    args = parser.parse_args()
    if args.replay:
        name, s = args.replay.split(":")
        return replay(name, int(s))
    if args.worker:
        print(json.dumps(worker(args.worker, args.cases, args.seed)))
        return
    results = []
    for name in args.targets.split(","):
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}: choose from {', '.join(TARGETS)}")
        # One process per target, so that each peak RSS is its own.
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--cases",
                              str(args.cases), "--seed", str(args.seed)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            results.append({"target": name, "cases": args.cases, "unexpected": "worker died",
                            "stderr": out.stderr[-2000:]})
        else:
            results.append(json.loads(out.stdout))
        print(json.dumps(results[-1], indent=1), file=sys.stderr, flush=True)
    print(f"| target | cases | unexpected exceptions | hangs (> {CASE_SECONDS:g} s) "
          "| max traced peak per case | peak RSS | time |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['target']} | {r['cases']} | {r['unexpected']} | {r.get('hangs', '-')} | "
              f"{r.get('traced_peak_mib', '-')} MiB | {r.get('vm_hwm_mib', '-')} MiB | "
              f"{r.get('seconds', '-')} s |")
    bad = [r for r in results if r["unexpected"] != 0 or r.get("hangs")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
