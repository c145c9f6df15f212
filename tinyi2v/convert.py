"""Convert upstream checkpoints into tinyi2v component folders, without torch.

    tinyi2v convert --from mobilei2v hybrid_371.pth my-model/transformer
    tinyi2v convert --from turbo-vaed turbo_vaed_ltx.pth my-model/decoder
    tinyi2v convert --from folder ltx-video/vae my-model/vae          (FP32 folder -> FP16)

The official MobileI2V checkpoint is a torch zip whose pickle holds {"state_dict": {...}}. We
read it with a restricted unpickler (tensors and containers only, never code), drop the entries
the forward pass never reads, read the architecture from the tensor shapes, check every tensor
against it, and write config.json + FP16 safetensors under the upstream names.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import denoiser
from .errors import FormatError
from .io.checkpoint import load_checkpoint, state_dict_from_checkpoint
from .io.safetensors import SafetensorsFile
from .vae import turbo_vaed
from .weights import CONFIG_NAME, Component, check_tensors, read_json, save_component

DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}


def mobilei2v_config(shapes: Mapping[str, tuple]) -> dict:
    """The denoiser config implied by an official state dict's shapes (nothing hard-coded but
    what upstream hard-codes: head size 72, RoPE scales, epsilons)."""
    needed = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight",
              "blocks.0.mlp.point_conv.conv.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise FormatError(f"not a MobileI2V denoiser checkpoint: missing {', '.join(missing)}")
    blocks = sorted({int(m.group(1)) for k in shapes
                     if (m := re.match(r"blocks\.(\d+)\.scale_shift_table$", k))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise FormatError(f"not a MobileI2V denoiser checkpoint: block indices {blocks}")
    hidden, in_channels = shapes["x_embedder.proj.weight"][:2]
    return denoiser.official_config(
        in_channels=in_channels, hidden_size=hidden, num_blocks=len(blocks),
        # softmax blocks are the ones without q/k RMSNorm (they carry a qkv bias instead)
        softmax_blocks=tuple(i for i in blocks if f"blocks.{i}.attn.q_norm.weight" not in shapes),
        mlp_hidden_size=shapes["blocks.0.mlp.point_conv.conv.weight"][1],
        out_channels=shapes["final_layer.linear.weight"][0],
        freq_dim=shapes["t_embedder.mlp.0.weight"][1])


def convert_mobilei2v(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: str = "float16", log: Callable[[str], None] = print) -> Path:
    """Official MobileI2V .pth -> transformer component folder. Returns the folder."""
    if dtype not in DTYPES:
        raise FormatError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    state = state_dict_from_checkpoint(load_checkpoint(checkpoint))
    dead = sorted(k for k in state if denoiser.is_dead_key(k))
    live = {k: v for k, v in state.items() if not denoiser.is_dead_key(k)}
    shapes = {k: v.shape for k, v in live.items()}
    config = mobilei2v_config(shapes)
    check_tensors(shapes, denoiser.param_shapes(config), str(checkpoint))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    dropped = f"; dropped {len(dead)} unused by the forward pass ({', '.join(dead)})" if dead else ""
    log(f"read {len(state)} tensors{dropped}")
    log(f"MobileI2V denoiser: hidden {config['hidden_size']}, {config['num_blocks']} blocks "
        f"(softmax at {config['softmax_blocks']}), {n_params:,} parameters")
    return save_converted(out_dir, config, live, checkpoint, dtype, log)


def turbo_vaed_state_dict(checkpoint: str | os.PathLike,
                          log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """The decoder tensors of a Turbo-VAED checkpoint under decoder-level names.

    Accepts what upstream produces: a .safetensors file or a torch .pth holding the decoder's
    state dict (what its loader feeds to `model.decoder.load_state_dict`), the whole model's
    (`decoder.` prefix), or a training checkpoint ({"state_dict": {"gen_model": ...}}; its EMA
    copy is not read). Distillation heads and the unused latents_mean/std buffers are dropped.
    """
    if Path(checkpoint).suffix == ".safetensors":
        file = SafetensorsFile(checkpoint)
        state = {k: file[k] for k in file}
    else:
        obj = load_checkpoint(checkpoint)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if isinstance(obj, dict) and isinstance(obj.get("gen_model"), dict):
            obj = obj["gen_model"]
        state = state_dict_from_checkpoint(obj)
    if any(k.startswith("decoder.") for k in state):          # a whole-model state dict
        dropped = sorted(k for k in state if not k.startswith("decoder."))
        state = {k.removeprefix("decoder."): v for k, v in state.items()
                 if k.startswith("decoder.")}
    else:
        dropped = sorted(k for k in state if k.startswith(turbo_vaed.DISTILLATION_ONLY))
        state = {k: v for k, v in state.items() if k not in dropped}
    if dropped:
        log(f"dropped {len(dropped)} tensors that are not the decoder's ({', '.join(dropped)})")
    return state


def convert_turbo_vaed(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                       dtype: str = "float16", config_path: str | os.PathLike | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """Turbo-VAED decoder checkpoint -> decoder component folder. Returns the folder.

    The architecture is read from the shapes, the other fields come from the official
    Turbo-VAED-LTX config; `config_path` (a JSON object) overrides any of them. Upstream loads
    with strict=False, which leaves missing weights random; here every tensor must match.
    """
    if dtype not in DTYPES:
        raise FormatError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    state = turbo_vaed_state_dict(checkpoint, log)
    shapes = {k: v.shape for k, v in state.items()}
    config = turbo_vaed.config_from_shapes(shapes)
    if config_path is not None:
        config |= read_json(Path(config_path))
    config["_class_name"] = turbo_vaed.CLASS_NAME
    check_tensors(shapes, turbo_vaed.param_shapes(config), str(checkpoint))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    log(f"Turbo-VAED decoder: {len(state)} tensors, {n_params:,} parameters, channels "
        f"{config['decoder_block_out_channels']}, layers {config['decoder_layers_per_block']}")
    return save_converted(out_dir, config, state, checkpoint, dtype, log)


def save_converted(out_dir: str | os.PathLike, config: dict, tensors: dict, checkpoint,
                   dtype: str, log: Callable[[str], None]) -> Path:
    """Write the component folder, recording where it came from."""
    out = save_component(out_dir, {**config, "source": f"converted from {Path(checkpoint).name}"},
                         tensors, dtype=DTYPES[dtype])
    log(f"wrote {out} ({DTYPES[dtype]})")
    return out


def convert_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   dtype: str = "float16", log: Callable[[str], None] = print) -> Path:
    """Re-save a component folder (config.json + one .safetensors) with its floating tensors in
    `dtype`, names and config unchanged: e.g. LTX-Video's 1.7 GB FP32 `vae/` as 0.84 GB FP16.

    Each tensor is converted while writing. An F32 source is memory-mapped; an F16 source is
    read whole first (its file size); a BF16 one upcast to float32 first (twice its file size).
    """
    if dtype not in DTYPES:
        raise FormatError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (Path(in_dir) / "model_index.json").is_file():
        raise FormatError(f"{in_dir}: a model folder; convert its component folders one by one")
    if not (Path(in_dir) / CONFIG_NAME).is_file():
        raise FormatError(f"{in_dir}: not a component folder (no {CONFIG_NAME})")
    component = Component(in_dir)
    tensors = {name: component.file[name] for name in component}   # stored dtype, no upcast
    out = save_component(out_dir, component.config, tensors, dtype=DTYPES[dtype])
    log(f"wrote {out}: {len(tensors)} tensors as {DTYPES[dtype]}")
    return out
