"""Model folders: the diffusers layout, FP16 on disk, float32 only while a tensor is in use.

    my-model/
      model_index.json                 {"_class_name": "TinyI2VPipeline", "transformer": [...], ...}
      transformer/config.json          architecture sizes + "_tinyi2v_format_version"
      transformer/diffusion_pytorch_model.safetensors
      vae/config.json + vae/diffusion_pytorch_model.safetensors
      scheduler/scheduler_config.json  the sampling schedule

Tensors keep their upstream names. A `Component` hands out float32 arrays: an F32 file gives
zero-copy views of the memory-mapped file; an F16/BF16 file is read (from the OS's page cache
after the first time) and upcast one tensor at a time as the model needs it, so the process never
holds an FP32 copy of the whole model, nor its FP16 pages (numpy's own FP16 matmul is ~300x
slower than FP32, so compute always happens in FP32).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from . import ops
from .errors import FormatError
from .io.safetensors import SafetensorsFile, save_file

FORMAT_VERSION = 1
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    # ValueError covers bad UTF-8 and bad JSON; RecursionError deeply nested brackets.
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


MAX_SIZE = 65536  # bounds every count and size in a config: loops over them stay short


def _kind_ok(value: object, like: object, least: int) -> bool:
    """Whether `value` has the JSON type of the reference value `like` (ints count as floats;
    None stands for an optional integer), with ints in [least, MAX_SIZE] and floats finite."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if like is None:
        return value is None or _kind_ok(value, 1, least)
    if isinstance(like, int):
        return isinstance(value, int) and least <= value <= MAX_SIZE
    if isinstance(like, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, type(like))


def check_config(config: object, reference: Mapping, where: str,
                 required: Iterable[str] = ()) -> None:
    """Refuse a config whose values do not have the types of `reference`'s (a list where a size
    belongs, a string for a flag, a size of 0 or 10**12), before any code computes with them.

    Scalar ints are sizes or counts: 1..MAX_SIZE; ints inside lists (layer counts, block
    indices) may be 0. Lists are checked element by element against the reference's first
    element. Keys in `required` must be present; keys not in `reference` are not checked.
    """
    if not isinstance(config, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for key, like in reference.items():
        if key not in config:
            if key in required:
                raise FormatError(f"{where}: config has no {key!r}")
            continue
        value = config[key]
        if isinstance(like, list) and like:
            ok = (isinstance(value, list) and len(value) <= MAX_SIZE
                  and all(_kind_ok(v, like[0], 0) for v in value))
            expected = f"a list, each item {_describe(like[0], 0)}"
        else:
            ok, expected = _kind_ok(value, like, 1), _describe(like, 1)
        if not ok:
            raise FormatError(f"{where}: config {key} = {value!r:.60} must be {expected}")


def _describe(like: object, least: int) -> str:
    if isinstance(like, bool):
        return "true or false"
    if like is None or isinstance(like, int):
        return f"an integer in {least}..{MAX_SIZE}" + (" or null" if like is None else "")
    if isinstance(like, float):
        return "a finite number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(like), type(like).__name__)


def component_dir(path: str | os.PathLike, name: str) -> Path:
    """A component folder, given either it or a model folder that contains it as `name/`."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / name
    if not (path / CONFIG_NAME).is_file():
        raise FormatError(f"{path}: not a model folder or a '{name}' component folder "
                          f"(no {CONFIG_NAME} or model_index.json)")
    return path


class Component(Mapping):
    """A component folder opened for reading: `.config` (dict) and name -> float32 array."""

    def __init__(self, path: str | os.PathLike, use_mmap: bool | None = None):
        self.path = Path(path)
        self.config = read_json(self.path / CONFIG_NAME)
        version = self.config.get("_tinyi2v_format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatError(f"{self.path}: format version {version!r:.40} is newer than this "
                              f"tinyi2v understands ({FORMAT_VERSION}); upgrade tinyi2v")
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) != 1:
            raise FormatError(f"{self.path}: expected exactly one .safetensors file, "
                              f"found {len(files)}")
        # Half-precision tensors are converted on every read anyway, so mapping them saves no
        # copy and would leave their pages resident; by default only float32 files are mapped.
        self.file = SafetensorsFile(files[0], use_mmap=False if use_mmap is None else use_mmap)
        if use_mmap is None and self.storage_dtypes() <= {"F32"}:
            self.file.close()
            self.file = SafetensorsFile(files[0])

    def __getitem__(self, name: str) -> np.ndarray:
        a = self.file[name]
        return a if a.dtype == np.float32 else ops.to_float32(a)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file)

    def __len__(self) -> int:
        return len(self.file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.file.shape_of(k) for k in self.file}

    def storage_dtypes(self) -> set[str]:
        return {self.file.dtype_of(k) for k in self.file}


def check_tensors(found: Mapping[str, tuple], expected: Mapping[str, tuple], where: str,
                  allow_extra: bool = False) -> None:
    """Raise one FormatError naming every missing, mis-shaped (and unexpected) tensor."""
    missing = [k for k in expected if k not in found]
    wrong = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    extra = [] if allow_extra else [k[:100] for k in found if k not in expected]  # any length
    problems = []
    for label, names in (("missing", missing), ("wrong shape", wrong), ("unexpected", extra)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise FormatError(f"{where}: tensors do not match the architecture: " + "; ".join(problems))


def save_model_index(path: str | os.PathLike, components: Mapping[str, list[str]],
                     defaults: Mapping | None = None) -> Path:
    """Write model_index.json: the components ({"transformer": ["tinyi2v", class], ...}) and the
    defaults the CLI uses (height, width, frames, fps, motion)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "TinyI2VPipeline", "_tinyi2v_format_version": FORMAT_VERSION,
             **components, **({"defaults": dict(defaults)} if defaults else {})}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def save_component(path: str | os.PathLike, config: Mapping, tensors: Mapping[str, np.ndarray],
                   dtype: str = "F16") -> Path:
    """Write a component folder atomically (build it beside the target, then rename).

    `dtype` "F16" (default), "BF16" or "F32" for floating tensors. Refuses an existing
    non-empty target, and values that FP16 cannot hold.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FormatError(f"{path}: already exists and is not an empty folder")
    if dtype == "F16":
        for name, a in tensors.items():
            if a.dtype.kind == "f" and np.any(np.abs(a[np.isfinite(a)]) > 65504.0):
                raise FormatError(f"tensor {name!r} has values beyond the FP16 range; "
                                  "save it with dtype float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                         # mkdtemp makes it private
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump({**config, "_tinyi2v_format_version": FORMAT_VERSION}, f, indent=2)
            f.write("\n")
        save_file(tensors, tmp / WEIGHTS_NAME, dtype=dtype)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
