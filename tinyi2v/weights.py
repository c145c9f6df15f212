"""Model folders: the diffusers layout, FP16 on disk, float32 only while a tensor is in use.

    my-model/
      model_index.json                 {"_class_name": "TinyI2VPipeline", "transformer": [...], ...}
      transformer/config.json          architecture sizes + "_tinyi2v_format_version"
      transformer/diffusion_pytorch_model.safetensors
      vae/config.json + vae/diffusion_pytorch_model.safetensors
      scheduler/scheduler_config.json  the sampling schedule

Tensors keep their upstream names. A `Component` hands out float32 arrays: an F32 file gives
zero-copy views of the memory-mapped file, an F16/BF16 file is upcast one tensor at a time as the
model reads it, so the process never holds an FP32 copy of the whole model (numpy's own FP16
matmul is ~300x slower than FP32, so compute always happens in FP32).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


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
            raise FormatError(f"{self.path}: format version {version!r} is newer than this "
                              f"tinyi2v understands ({FORMAT_VERSION}); upgrade tinyi2v")
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) != 1:
            raise FormatError(f"{self.path}: expected exactly one .safetensors file, "
                              f"found {len(files)}")
        self.file = SafetensorsFile(files[0], use_mmap=use_mmap)

    def __getitem__(self, name: str) -> np.ndarray:
        a = self.file[name]
        return a if a.dtype == np.float32 else a.astype(np.float32)

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
    extra = [] if allow_extra else [k for k in found if k not in expected]
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
