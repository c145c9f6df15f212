"""Read PyTorch checkpoints (`.pth`/`.pt` written by `torch.save`) with numpy alone.

Since torch 1.6, `torch.save` writes a zip archive whose entries all sit under one folder:

    <archive>/data.pkl              the saved object as a pickle (protocol 2)
    <archive>/data/<key>            one raw storage per key: the elements back to back,
                                    stored uncompressed, byte order given by `byteorder`
    <archive>/byteorder             "little" or "big" (absent in older files: little)
    <archive>/.format_version, version, .storage_alignment, .data/serialization_id
                                    bookkeeping we do not need

In data.pkl each tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks)`, where `storage` is a persistent id
`('storage', torch.FloatStorage, key, location, numel)` naming `data/<key>`.

We never hand the file to plain `pickle.load` (which is what `torch.load(weights_only=False)`
does): a pickle is a small program that may import and call any function, so loading an
untrusted checkpoint that way can run arbitrary code. Instead:

1. the opcodes are checked first without running them (`pickletools.genops`): only opcodes
   that build plain data are allowed, memo indices must be dense and nesting bounded, since
   the C unpickler would otherwise allocate gigabytes for one huge memo index, or crash
   hashing a deeply nested tuple;
2. the unpickler resolves globals from a short allow-list only, and maps each to our own
   numpy-building functions, never to the real torch objects.

The result holds dicts, lists, tuples, strings, numbers, None and numpy arrays.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from tinyi2v.errors import FormatError

_MAX_PICKLE_BYTES = 256 * 2**20
# Deeper than anything CPython's recursive pickler can write (it stops near 1000 levels), and
# shallow enough that C-level recursion (hashing nested tuples) stays far from the stack limit.
_MAX_NESTING = 1000
_MAX_INT = 2**62  # any legitimate size, stride or offset is far smaller
_MAX_NDIM = 64  # numpy's limit

_NOT_ALLOWED = "a checkpoint may only contain tensors and containers"


class _Sealed:
    """Base of every object our unpickler hands to the pickle program.

    The BUILD opcode would otherwise let a pickle overwrite their attributes (and, for plain
    functions, their `__defaults__`), changing how later tensors or later loads are rebuilt.
    """

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise FormatError(f"BUILD on {type(self).__name__} is not allowed: {_NOT_ALLOWED}")


class _StorageType(_Sealed):
    """Stands for `torch.FloatStorage` etc.; only ever used inside persistent ids."""

    __slots__ = ("dtype", "out_dtype", "convert")

    def __init__(
        self, dtype: str, out_dtype: str, convert: Callable[[np.ndarray], np.ndarray] | None
    ):
        self.dtype = np.dtype(dtype)  # as stored
        self.out_dtype = np.dtype(out_dtype)  # as returned; `convert` makes it when they differ
        self.convert = convert


class _Global(_Sealed):
    """An allowed global: callable from REDUCE, nothing else."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        try:
            return self.fn(*args)
        except TypeError as exc:  # a wrong number of arguments
            raise FormatError(f"bad call of {self.name}: {exc}") from None


class _Storage(_Sealed):
    """Lazy descriptor of `data/<key>`: its bytes are read when a tensor first uses them."""

    __slots__ = ("reader", "key", "stype", "numel")

    def __init__(self, reader: _ArchiveReader, key: str, stype: _StorageType, numel: int):
        self.reader = reader
        self.key = key
        self.stype = stype
        self.numel = numel

    def elements(self) -> np.ndarray:
        """The storage as a flat array of its stored dtype, in the file's byte order."""
        raw = self.reader.storage_bytes(self.key, self.numel * self.stype.dtype.itemsize)
        return np.frombuffer(raw, dtype=self.stype.dtype.newbyteorder(self.reader.byteorder))


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32. Flatten first: ufuncs on 0-d arrays give scalars.
    return (bits.reshape(-1).astype(np.uint32) << 16).view(np.float32).reshape(bits.shape)


def _nonzero(raw: np.ndarray) -> np.ndarray:
    # Any byte but 0 is true; viewing the bytes as np.bool_ would keep odd values like 2.
    return raw != 0


_STORAGE_TYPES = {
    "FloatStorage": _StorageType("f4", "f4", None),
    "HalfStorage": _StorageType("f2", "f2", None),
    "BFloat16Storage": _StorageType("u2", "f4", _bf16_to_f32),
    "DoubleStorage": _StorageType("f8", "f8", None),
    "LongStorage": _StorageType("i8", "i8", None),
    "IntStorage": _StorageType("i4", "i4", None),
    "ShortStorage": _StorageType("i2", "i2", None),
    "CharStorage": _StorageType("i1", "i1", None),
    "ByteStorage": _StorageType("u1", "u1", None),
    "BoolStorage": _StorageType("u1", "?", _nonzero),
}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_dims(what: str, dims: object) -> tuple[int, ...]:
    if not isinstance(dims, tuple) or len(dims) > _MAX_NDIM:
        raise FormatError(f"{what} must be a tuple of at most {_MAX_NDIM} integers: {dims!r:.80}")
    if not all(_is_int(d) and 0 <= d < _MAX_INT for d in dims):
        raise FormatError(f"{what} {dims!r:.80} must hold non-negative integers")
    return dims


def _tensor(storage: object, offset: object, size: object, stride: object) -> np.ndarray:
    """Build the array a torch tensor view (storage, offset, size, stride) describes."""
    if not isinstance(storage, _Storage):
        raise FormatError(f"tensor storage is a {type(storage).__name__}, not a storage")
    where = f"tensor in storage 'data/{storage.key}'"
    size = _check_dims(f"{where}: size", size)
    stride = _check_dims(f"{where}: stride", stride)
    if len(stride) != len(size):
        raise FormatError(f"{where}: size {size} and stride {stride} differ in length")
    if not (_is_int(offset) and 0 <= offset < _MAX_INT):
        raise FormatError(f"{where}: storage offset {offset!r:.80} is not a non-negative integer")
    flat = storage.elements()  # also checks that the storage exists and has the right size
    numel = 1
    for n in size:
        numel *= n
    if numel == 0:
        return np.zeros(size, storage.stype.out_dtype)
    # Check bounds with Python ints before numpy sees anything: as_strided does no checking.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
        raise FormatError(
            f"{where}: offset {offset}, size {size}, stride {stride} reach element {last} "
            f"but the storage holds {storage.numel}"
        )
    # Zero or overlapping strides would let a tiny storage expand into a huge copy.
    if numel > storage.numel:
        raise FormatError(
            f"{where}: {numel} elements from a storage of {storage.numel} "
            "(expanded or overlapping views are not supported)"
        )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * itemsize for s in stride]
    )
    # A contiguous view shares the storage's buffer (as views do in torch); others are copied.
    arr = view if view.flags.c_contiguous else view.copy()
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if storage.stype.convert is None else storage.stype.convert(arr)


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> np.ndarray:
    # requires_grad, backward_hooks and metadata only matter to autograd and tensor subclasses.
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(
    storage: object, storage_offset: object, size: object, stride: object
) -> np.ndarray:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise FormatError(f"nn.Parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _allowed(module: str, name: str, fn: Callable[..., Any]) -> tuple[tuple[str, str], _Global]:
    return (module, name), _Global(f"{module}.{name}", fn)


_GLOBALS: dict[tuple[str, str], _Sealed] = dict(
    [
        _allowed("collections", "OrderedDict", OrderedDict),
        _allowed("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor_v2),
        _allowed("torch._utils", "_rebuild_tensor", _rebuild_tensor),
        _allowed("torch._utils", "_rebuild_parameter", _rebuild_parameter),
        *((("torch", name), stype) for name, stype in _STORAGE_TYPES.items()),
    ]
)

# Opcodes that only build plain data. Left out: INST, OBJ, NEWOBJ, NEWOBJ_EX (instantiate
# classes), EXT1/2/4 (fetch globals from the copyreg registry, bypassing find_class), PERSID
# (text persistent ids; torch writes tuples), NEXT_BUFFER/READONLY_BUFFER (out-of-band data)
# and STRING/BINSTRING/SHORT_BINSTRING (Python 2 str, never written by Python 3).
_ATOM_OPS = frozenset(
    "NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT "
    "UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8 "
    "BYTEARRAY8 EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET GLOBAL".split()
)


class _OpcodeCheck:
    """Replays a pickle's stack effects on nesting depths only, executing nothing.

    Marks are kept apart from the stack, as the C unpickler keeps them, so that popping across
    a mark is refused here exactly when it is refused there.
    """

    def __init__(self) -> None:
        self.stack: list[int] = []  # nesting depth of each item
        self.marks: list[int] = []  # stack length at each open MARK
        self.memo: dict[int, int] = {}

    def pop(self) -> int:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise FormatError("data.pkl: stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[int]:
        if not self.marks:
            raise FormatError("data.pkl: missing MARK")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def peek(self) -> int:
        depth = self.pop()
        self.stack.append(depth)
        return depth

    def push(self, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise FormatError(f"data.pkl: nesting too deep (over {_MAX_NESTING} levels)")
        self.stack.append(depth)

    def grow(self, items: list[int]) -> None:
        """APPEND(S)/SETITEM(S)/ADDITEMS/BUILD: the items go into the container below them."""
        self.push(max(self.pop(), 1 + max(items, default=0)))

    def step(self, name: str, arg: Any) -> None:
        if name in _ATOM_OPS:
            self.push(0)
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
            self.push(1 + max(self.pop_mark(), default=0))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            self.push(1 + max(self.pop() for _ in range(int(name[-1]))))
        elif name in ("REDUCE", "STACK_GLOBAL"):
            self.push(1 + max(self.pop(), self.pop()))
        elif name == "BINPERSID":
            self.push(1 + self.pop())
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            self.grow(self.pop_mark())
        elif name in ("APPEND", "BUILD"):
            self.grow([self.pop()])
        elif name == "SETITEM":
            self.grow([self.pop(), self.pop()])
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.push(self.peek())
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(self.memo) if name == "MEMOIZE" else arg
            # Picklers number memo slots 0, 1, 2, ...; a far-off index makes the C unpickler
            # allocate (and zero) a memo table that large: 32 GiB for a 10-byte pickle.
            if index > len(self.memo):
                raise FormatError(f"data.pkl: memo index {index} out of sequence")
            self.memo[index] = self.peek()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise FormatError(f"data.pkl: memo index {arg} was never stored")
            self.push(self.memo[arg])
        elif name not in ("PROTO", "FRAME", "STOP"):
            raise FormatError(f"data.pkl: refusing pickle opcode {name}: {_NOT_ALLOWED}")


def _check_opcodes(data: bytes) -> None:
    check = _OpcodeCheck()
    with warnings.catch_warnings():
        # genops decodes an argument before we see its opcode: a STRING opcode (refused by
        # step) with a bad escape sequence would otherwise warn, or raise under `-W error`.
        warnings.simplefilter("ignore", DeprecationWarning)
        for op, arg, _pos in pickletools.genops(data):
            check.step(op.name, arg)


class _ArchiveReader:
    """The zip archive of one checkpoint: finds its records and reads storages once each."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zf = zf
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            found = "no" if not pickles else "several"
            raise FormatError(f"{found} <archive>/data.pkl in the zip: not a torch.save file")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.byteorder = self._byteorder()
        self._cache: dict[str, bytearray] = {}

    def _byteorder(self) -> str:
        try:
            info = self.zf.getinfo(self.prefix + "byteorder")
        except KeyError:
            return "<"  # older torch wrote no byteorder record, and only little-endian
        with self.zf.open(info) as f:
            text = f.read(17)  # never more: the record may be a compressed zip bomb
        if len(text) > 16:
            raise FormatError(f"byteorder record is {info.file_size} bytes, not 'little' or 'big'")
        text = text.strip()
        orders = {b"little": "<", b"big": ">"}
        if text not in orders:
            raise FormatError(f"unknown byteorder {text[:20]!r}")
        return orders[text]

    def pickle_bytes(self) -> bytes:
        info = self.zf.getinfo(self.prefix + "data.pkl")
        if info.file_size > _MAX_PICKLE_BYTES:
            raise FormatError(
                f"data.pkl is {info.file_size} bytes, over the {_MAX_PICKLE_BYTES}-byte limit"
            )
        with self.zf.open(info) as f:
            data = f.read(_MAX_PICKLE_BYTES + 1)  # the header's size may lie
        if len(data) > _MAX_PICKLE_BYTES:
            raise FormatError(f"data.pkl is over the {_MAX_PICKLE_BYTES}-byte limit")
        return data

    def storage_bytes(self, key: str, nbytes: int) -> bytearray:
        try:
            info = self.zf.getinfo(f"{self.prefix}data/{key}")
        except KeyError:
            raise FormatError(f"storage 'data/{key}' is missing from the archive") from None
        if info.file_size != nbytes:
            raise FormatError(
                f"storage 'data/{key}' holds {info.file_size} bytes, expected {nbytes}"
            )
        # torch stores storages uncompressed; refusing compression rules out zip bombs, since
        # the bytes we allocate are then bytes really present in the file.
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(f"storage 'data/{key}' is compressed, which torch.save never does")
        if key not in self._cache:
            buf = bytearray(nbytes)  # writable, so that the arrays viewing it are too
            with self.zf.open(info) as f:
                got = f.readinto(buf)  # reading to the end also checks the CRC
            if got != nbytes:
                raise FormatError(f"storage 'data/{key}' is truncated")
            self._cache[key] = buf
        return self._cache[key]


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only allow-listed globals and storage persistent ids."""

    def __init__(self, data: bytes, reader: _ArchiveReader):
        super().__init__(io.BytesIO(data))
        self.reader = reader

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            what = f"{module}.{name}"[:80]  # names come from the file: any length
            raise FormatError(f"refusing to load {what!r}: {_NOT_ALLOWED}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        is_storage = isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[0], str)
        if not (is_storage and pid[0] == "storage"):
            raise FormatError(f"unsupported persistent id {pid!r:.80}: only storages are allowed")
        _, stype, key, _location, numel = pid  # the location (cpu, cuda:0) does not matter here
        if not isinstance(stype, _StorageType):
            raise FormatError(f"persistent id names {stype!r:.80}, not a storage type")
        if not isinstance(key, str) or not (_is_int(numel) and 0 <= numel < _MAX_INT):
            raise FormatError(f"malformed storage id {pid!r:.80}")
        return _Storage(self.reader, key, stype, numel)


_LEAVES = (type(None), bool, int, float, str, bytes, bytearray, np.ndarray)
_CONTAINERS = (dict, list, tuple, set, frozenset)


def _check_result(obj: object) -> None:
    """Refuse leftovers of the unpickling machinery (a bare storage or global), and nesting
    built by mutation, which the opcode check cannot see. Iterative, so depth cannot crash it."""
    seen: set[int] = set()
    todo = [(obj, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, _LEAVES):
            continue
        if not isinstance(item, _CONTAINERS):
            raise FormatError(f"unexpected {type(item).__name__} in the file: {_NOT_ALLOWED}")
        if depth >= _MAX_NESTING:
            raise FormatError(f"nesting too deep (over {_MAX_NESTING} levels)")
        if id(item) in seen:
            continue
        seen.add(id(item))
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        todo.extend((child, depth + 1) for child in children)


# Everything a malformed archive or pickle can raise from zipfile, pickle or numpy; mapped to
# FormatError so that callers need to catch one exception for a bad file.
_BAD_FILE_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    OSError,  # zipfile seeking to a corrupt offset in the already opened file
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RuntimeError,  # RecursionError; also zipfile's "encrypted" and NotImplementedError
)


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a `torch.save` zip checkpoint: its object with every tensor as a numpy array.

    Containers come back as dict (OrderedDict where torch saved one), list and tuple; leaves
    are str, int, float, bool, None and np.ndarray (bfloat16 as float32, everything else in its
    own dtype). Arrays that were views of one storage may share memory, as the tensors did.
    Raises FormatError for anything that is not a plain checkpoint of tensors and containers,
    and for a missing or unreadable file (the one error class callers need to catch).
    """
    where = str(path)
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise FormatError(f"{where}: cannot open ({exc.strerror or exc})") from None
    with file:
        try:
            return _load(file)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        except RecursionError:
            raise FormatError(f"{where}: nesting too deep") from None
        except _BAD_FILE_ERRORS as exc:
            kind = type(exc).__name__
            # zipfile quotes raw header bytes, which can be long: keep the message one short line
            detail = " ".join(str(exc).split())[:200]
            raise FormatError(f"{where}: malformed checkpoint ({kind}: {detail})") from None


def _load(file: io.BufferedReader) -> Any:
    try:
        zf = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise FormatError(
            "not a zip archive; only the zip checkpoint format (torch.save since torch 1.6) "
            "is supported, not the legacy format or other files"
        ) from None
    with zf:
        reader = _ArchiveReader(zf)
        data = reader.pickle_bytes()
        _check_opcodes(data)
        obj = _Unpickler(data, reader).load()
    _check_result(obj)
    return obj


def state_dict_from_checkpoint(obj: object) -> dict[str, np.ndarray]:
    """The name -> array mapping inside a loaded checkpoint.

    Takes obj["state_dict"], obj["model"] or obj["module"] when that is a dict (the usual
    wrappers, with epochs and optimizer state beside them), else obj itself.
    """
    if not isinstance(obj, dict):
        raise FormatError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    for key, value in obj.items():
        if not isinstance(key, str):
            raise FormatError(f"state dict key {key!r:.80} is not a string")
        if not isinstance(value, np.ndarray):
            kind = type(value).__name__
            raise FormatError(f"state dict entry {key!r:.80} is a {kind}, not a tensor")
    return dict(obj)
