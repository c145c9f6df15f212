"""Convert upstream checkpoints into tinyi2v component folders, without torch.

    tinyi2v convert --from mobilei2v hybrid_371.pth my-model/transformer

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
from .weights import check_tensors, save_component

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
    log(f"read {len(state)} tensors; dropped {len(dead)} unused by the forward pass "
        f"({', '.join(dead)})")
    log(f"MobileI2V denoiser: hidden {config['hidden_size']}, {config['num_blocks']} blocks "
        f"(softmax at {config['softmax_blocks']}), {n_params:,} parameters")
    out = save_component(out_dir, {**config, "source": f"converted from {Path(checkpoint).name}"},
                         live, dtype=DTYPES[dtype])
    log(f"wrote {out} ({DTYPES[dtype]})")
    return out
