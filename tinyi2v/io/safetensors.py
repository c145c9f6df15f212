"""Read and write safetensors files with numpy alone (no `safetensors` package, no torch).

A safetensors file is three parts, back to back:

    8 bytes   N, the header length, an unsigned 64-bit little-endian integer
    N bytes   UTF-8 JSON object
              {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
              plus an optional "__metadata__": {str: str}; writers pad it with spaces
    the rest  the byte buffer: each tensor's C-order little-endian bytes at [begin, end),
              offsets counted from the start of the buffer, not of the file

The header is untrusted input, so it is validated in full before any tensor is read: the
tensors must tile the buffer exactly (no overlaps, no holes, no trailing bytes), which is
what the official implementation enforces too.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from tinyi2v.errors import FormatError

try:  # Pyodide (numpy in the browser) has no mmap module; we fall back to seek+read there
    import mmap as _mmap
except ImportError:  # pragma: no cover - CPython always has it
    _mmap = None

# Safetensors dtype string -> numpy dtype of the stored bytes (explicitly little-endian).
# numpy has no bfloat16, so BF16 is stored and read as its raw uint16 bit patterns.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# numpy (kind, itemsize) -> safetensors dtype for writing. BF16 is left out: a uint16 array is
# not bfloat16, and BF16 is only produced on purpose with save_file(..., dtype="BF16").
_CODE_OF: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): code for code, dt in DTYPES.items() if code != "BF16"
}

_MAX_HEADER = 100_000_000  # the official limit; refusing larger headers bounds what we allocate
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _is_int(x: Any) -> bool:
    # JSON true/false arrive as Python bools, which are ints; they are not valid sizes.
    return isinstance(x, int) and not isinstance(x, bool)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so shifting the bits back up is exact."""
    # Work on a flat copy: ufuncs on 0-d arrays return numpy scalars, and .view needs an array.
    wide = bits.reshape(-1).astype(np.uint32) << 16
    return wide.view(np.float32).reshape(bits.shape)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 bit patterns, to nearest with ties to even; NaN stays NaN.

    Other float types go through float32 first (exact for float16; float64 is rounded twice).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds half-way cases to even.
    # Values that round past the largest bfloat16 correctly carry into the infinity pattern.
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    # Rounding could turn a NaN whose payload sits only in the low bits into infinity,
    # so NaNs are truncated instead and their quiet bit is set.
    nan = (bits >> 16) | 0x0040
    out = np.where(np.isnan(x.reshape(-1)), nan, rounded).astype(np.uint16)
    return out.reshape(np.shape(x))


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping name -> np.ndarray over one safetensors file, read lazily.

    The header is parsed and validated when the file is opened; each tensor is read only when
    it is looked up. With mmap, a lookup of aligned data is a read-only zero-copy view of the
    file; otherwise (misaligned data, or no mmap) it is a fresh array. BF16 comes back as float32.
    """

    def __init__(self, path: str | os.PathLike, use_mmap: bool | None = None) -> None:
        self.name = os.fspath(path)
        # An explicit use_mmap wins; None means "mmap if it works here", unless the environment
        # asks for the plain read path (to test the Pyodide code path on CPython).
        required = use_mmap is not None
        if use_mmap is None:
            use_mmap = _mmap is not None and os.environ.get("TINYI2V_NO_MMAP", "") != "1"
        self._file = None
        self._mm = None
        try:
            self._file = open(path, "rb")
        except FileNotFoundError:
            raise FormatError(f"{self.name}: no such file") from None
        except OSError as e:
            raise FormatError(f"{self.name}: cannot open: {e.strerror or e}") from None
        try:
            self._read_header()
            if use_mmap:
                self._map(required)
        except BaseException:
            self.close()
            raise

    def _fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.name}: {problem}")

    def _read_header(self) -> None:
        try:
            size = os.fstat(self._file.fileno()).st_size
            prefix = self._file.read(8)
            if len(prefix) < 8:
                raise self._fail(f"file is {size} bytes, too short for the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            # Check N against the limit and the file size before reading, so a corrupt or
            # hostile length cannot make us allocate gigabytes.
            if n > _MAX_HEADER:
                raise self._fail(f"header length {n} exceeds the limit of {_MAX_HEADER} bytes")
            if 8 + n > size:
                raise self._fail(f"header length {n} runs past the end of the file ({size} bytes)")
            raw = self._file.read(n)
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror or e}") from None
        if len(raw) < n:
            raise self._fail("file shrank while reading the header")
        try:
            header = json.loads(raw.decode("utf-8"))
        # ValueError covers bad UTF-8 and bad JSON; RecursionError deeply nested brackets.
        except (ValueError, RecursionError) as e:
            raise self._fail(f"header is not valid UTF-8 JSON ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise self._fail(f"header is a JSON {type(header).__name__}, expected an object")

        metadata = header.pop("__metadata__", None)
        if metadata is None:  # absent, or null as some writers emit
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must be an object mapping strings to strings")
        self.metadata: dict[str, str] = metadata

        self._data_start = 8 + n
        buffer_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, buffer_size)
        self._check_tiling(buffer_size)

    def _check_entry(
        self, name: str, entry: Any, buffer_size: int
    ) -> tuple[str, tuple[int, ...], int, int]:
        where = f"tensor {name!r:.100}"  # reprs of header values are cut: any length
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise self._fail(f"{where}: expected an object with exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"{where}: unknown or unsupported dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail(f"{where}: shape {shape!r:.100} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(
                f"{where}: data_offsets {offsets!r:.100} is not [begin, end] with 0 <= begin <= end"
            )
        begin, end = offsets
        if end > buffer_size:
            raise self._fail(
                f"{where}: data_offsets {offsets} end past the data buffer ({buffer_size} bytes); "
                "file truncated?"
            )
        # Python ints cannot overflow, so a hostile shape like [2**40, 2**40] is just a mismatch.
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._fail(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, "
                f"but {dtype} {shape} needs {expected}"
            )
        return dtype, tuple(shape), begin, end

    def _check_tiling(self, buffer_size: int) -> None:
        # Sorted by (begin, end), the ranges must follow one another exactly from 0 to the end
        # of the buffer; zero-size tensors may sit at any boundary.
        pos, prev = 0, None
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda kv: kv[1][2:]):
            if begin < pos:
                raise self._fail(
                    f"tensor {name!r:.100} data_offsets [{begin}, {end}] overlap {prev!r:.100}, "
                    f"which ends at {pos}"
                )
            if begin > pos:
                raise self._fail(
                    f"hole: bytes [{pos}, {begin}) of the data buffer, before tensor {name!r:.100}, "
                    "belong to no tensor"
                )
            pos, prev = end, name
        if pos != buffer_size:
            raise self._fail(f"{buffer_size - pos} trailing bytes after the last tensor")

    def _map(self, required: bool) -> None:
        if _mmap is None:
            raise self._fail("use_mmap=True but mmap is not available on this platform")
        try:
            self._mm = _mmap.mmap(self._file.fileno(), 0, access=_mmap.ACCESS_READ)
        except OSError as e:
            if required:
                raise self._fail(f"cannot mmap: {e.strerror or e}") from None
            return  # some filesystems cannot be mapped; keep the file open for seek+read
        # The mapping stays valid without the descriptor, so do not hold one open.
        self._file.close()
        self._file = None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if self._mm is None and self._file is None:
            raise ValueError(f"{self.name}: file is closed")
        stored = DTYPES[dtype]
        offset = self._data_start + begin
        if self._mm is not None and offset % stored.itemsize == 0:
            # Zero copy: the array keeps the mapping alive through its .base.
            arr = np.frombuffer(self._mm, stored, count=math.prod(shape), offset=offset)
            arr = arr.reshape(shape)
        else:
            # Misaligned views are slow and break some code paths, so those get an aligned copy.
            arr = np.empty(shape, stored)
            dst = arr.reshape(-1).view(np.uint8)
            if self._mm is not None:
                dst[:] = np.frombuffer(self._mm, np.uint8, count=end - begin, offset=offset)
            elif end > begin:
                try:
                    self._file.seek(offset)
                    got = self._file.readinto(dst)
                except OSError as e:
                    raise self._fail(f"cannot read tensor {name!r:.100}: {e.strerror or e}") from None
                if got != end - begin:
                    raise self._fail(f"tensor {name!r:.100}: file was truncated after it was opened")
        return _bf16_to_f32(arr) if dtype == "BF16" else arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def dtype_of(self, name: str) -> str:
        """The safetensors dtype string of a tensor as stored, e.g. "BF16"."""
        return self._entries[name][0]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def nbytes_of(self, name: str) -> int:
        """Bytes the tensor occupies in the file (a BF16 tensor is read back twice as large)."""
        _, _, begin, end = self._entries[name]
        return end - begin

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views are still alive; the mapping is released when the last one dies
            self._mm = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.name!r}, {len(self)} tensors)"


def load_file(path: str | os.PathLike, use_mmap: bool | None = None) -> dict[str, np.ndarray]:
    """Read every tensor into memory; the returned arrays own their data and the file is closed."""
    with SafetensorsFile(path, use_mmap=use_mmap) as f:
        tensors = {}
        for name in f:
            arr = f[name]
            # Only zero-copy mmap views are read-only; any other result is already a fresh array.
            tensors[name] = arr if arr.flags.writeable else arr.copy()
        return tensors


def _plan(array: Any, dtype: str | None, where: str) -> tuple[str, np.ndarray]:
    """The safetensors dtype to store a tensor as, and the array itself (not converted yet)."""
    arr = np.asarray(array)
    if dtype is not None and arr.dtype.kind == "f":
        return dtype, arr
    code = _CODE_OF.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise FormatError(f"{where}: numpy dtype {arr.dtype} cannot be stored in safetensors")
    return code, arr


def _stored_bytes(arr: np.ndarray, code: str) -> np.ndarray:
    """The array converted to the exact little-endian C-order bytes the file holds."""
    if code == "BF16":
        return _f32_to_bf16(arr)
    return np.ascontiguousarray(arr, dtype=DTYPES[code])


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    dtype: str | None = None,
) -> None:
    """Write `tensors` to a safetensors file at `path`, atomically.

    dtype None keeps each array's type; "F32", "F16" or "BF16" converts every floating array to
    that type (BF16 rounds to nearest, ties to even). Either the whole file appears at `path`
    or, on any error, nothing changes there.
    """
    name = os.fspath(path)
    if dtype not in (None, "F32", "F16", "BF16"):
        raise ValueError(f"dtype must be None, 'F32', 'F16' or 'BF16', not {dtype!r}")
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{name}: metadata must map strings to strings")

    # Plan the whole header first; arrays are converted one at a time while writing, so a
    # conversion never needs memory for more than one tensor.
    plan: dict[str, tuple[str, np.ndarray]] = {}
    for key, array in tensors.items():
        if not isinstance(key, str) or key == "__metadata__":
            raise FormatError(f"{name}: invalid tensor name {key!r}")
        plan[key] = _plan(array, dtype, f"{name}: tensor {key!r}")
    # The buffer is filled back to back (the reader rejects holes), widest dtype first, as the
    # official writer does: then every tensor starts at a multiple of its itemsize and mmap can
    # hand out aligned zero-copy views. sorted() is stable, so ties keep insertion order.
    order = sorted(plan, key=lambda key: -DTYPES[plan[key][0]].itemsize)
    offsets, pos = {}, 0
    for key in order:
        code, arr = plan[key]
        offsets[key] = [pos, pos + arr.size * DTYPES[code].itemsize]
        pos = offsets[key][1]
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for key, (code, arr) in plan.items():  # the header itself lists tensors in insertion order
        header[key] = {"dtype": code, "shape": list(arr.shape), "data_offsets": offsets[key]}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # Space padding keeps the data buffer 8-byte aligned, so mmap views of it are aligned.
    text += b" " * (-len(text) % 8)

    # Write next to the target and rename over it: readers never see a half-written file, and
    # a file someone has mapped keeps its old contents. os.open with mode 0o666 lets the
    # umask decide the permissions, as a plain open() would.
    tmp = f"{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for key in order:
                code, arr = plan[key]
                f.write(_stored_bytes(arr, code).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
