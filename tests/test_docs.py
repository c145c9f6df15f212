"""The docs' commands, run as written: every ```sh block goes through bash (with this
environment's `tinyi2v` on PATH) and every ```python block through this interpreter, in order,
in a folder that holds stand-ins for the upstream files the docs name (tiny, official-layout,
random weights). A command that drifts from the CLI fails here."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyi2v.cli import cli
from tinyi2v.denoiser import official_config
from tinyi2v.io.safetensors import load_file
from tinyi2v.pipeline import Pipeline
from tinyi2v.weights import Component

from conftest import SHARED, make_tiny_model, need, random_denoiser_params

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/weights-format.md", "docs/converting.md", "docs/architecture.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]


def run_block(language: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" \
        else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture
def workspace(tmp_path):
    """The files the docs start from, under the names they use: an official-layout MobileI2V
    checkpoint (`hybrid_371.pth`, with the entries the converter drops), diffusers' LTX `vae/`
    folder (`ltx-video/vae`), a Turbo-VAED decoder state dict (`turbo_vaed_ltx.pth`), a photo,
    and a model folder (`my-model`) for docs that only read one. Latents have 8 channels
    throughout, so the assembled model runs."""
    torch = pytest.importorskip("torch")
    cfg = official_config(in_channels=8, hidden_size=72, num_blocks=2, softmax_blocks=(1,),
                          mlp_hidden_size=24, freq_dim=32)
    state = random_denoiser_params(cfg) | {"pos_embed": np.zeros((1, 4, 72), np.float32),
                                           "y_embedder.y_embedding": np.zeros((4, 16), np.float32)}
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}},
               tmp_path / "hybrid_371.pth")
    shutil.copytree(need(SHARED / "fixtures" / "ltx-vae-tiny"), tmp_path / "ltx-video" / "vae",
                    ignore=shutil.ignore_patterns("*.npy", "*.npz", "*.md"))
    turbo = need(SHARED / "fixtures" / "turbo-vaed-tiny" / "turbo_vaed_decoder.safetensors")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in load_file(turbo).items()},
               tmp_path / "turbo_vaed_ltx.pth")
    shutil.copy(ROOT / "examples" / "cat.jpg", tmp_path / "photo.jpg")
    return tmp_path


def run_doc(doc: str, cwd: Path) -> list[tuple[str, str]]:
    blocks = [(lang, code) for lang, code in code_blocks(ROOT / doc) if lang in ("sh", "python")]
    for language, code in blocks:
        result = run_block(language, code, cwd)
        assert result.returncode == 0, (f"{doc}: this {language} block failed:\n{code}\n"
                                        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return blocks


def test_converting_commands_build_a_model_that_runs(workspace):
    blocks = run_doc("docs/converting.md", workspace)
    commands = " ".join(code for _, code in blocks)
    convert = next(p for p in cli.commands["convert"].params if p.name == "source")
    for source in convert.type.choices:                           # every converter is shown
        assert f"--from {source}" in commands, f"docs/converting.md shows no --from {source}"
    pipe = Pipeline.load(workspace / "my-model")
    assert type(pipe.decoder).__name__ == "TurboVAEDDecoder"      # the doc's last index
    assert pipe.scheduler["num_inference_steps"] == 30
    assert (workspace / "clip.mp4").stat().st_size > 0 and (workspace / "clip-turbo.mp4").is_file()
    f32 = json.loads((workspace / "my-model-f32" / "transformer" / "config.json").read_text())
    assert f32["hidden_size"] == 72


def test_weights_format_commands(workspace):
    make_tiny_model(workspace / "my-model")
    blocks = run_doc("docs/weights-format.md", workspace)
    assert {lang for lang, _ in blocks} == {"sh", "python"}
    assert Component(workspace / "toy" / "transformer").storage_dtypes() == {"F16"}   # as it says


def test_weights_format_json_examples_are_read_as_documented():
    """The JSON blocks of weights-format.md: the index and both scheduler forms."""
    from tinyi2v.sampler import schedule_from_config

    examples = [json.loads(code) for lang, code in code_blocks(ROOT / "docs/weights-format.md")
                if lang == "json"]
    index, shifted, explicit = examples
    assert {"transformer", "vae", "scheduler"} <= set(index)
    assert len(schedule_from_config(shifted)) == 31
    assert schedule_from_config(explicit).tolist() == [1.0, 0.75, 0.0]


def test_every_doc_with_commands_is_run_above():
    with_commands = {doc for doc in DOCS
                     if any(lang in ("sh", "python") for lang, _ in code_blocks(ROOT / doc))}
    assert with_commands == {"docs/converting.md", "docs/weights-format.md"}


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / doc).parent.joinpath(target).exists(), f"{doc}: broken link {target}"
