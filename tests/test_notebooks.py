"""The teaching notebooks in examples/: committed without outputs, and every cell runs.

They run against the bundled model (weights/tinyi2v-demo) when it is there, else against a tiny
random model; the last notebook's conversion cell gets an official-layout checkpoint.
Strip outputs before committing: `python tests/test_notebooks.py --strip`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinyi2v.denoiser import official_config
from tinyi2v.weights import read_json

from conftest import make_tiny_model, random_denoiser_params

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
DEMO = ROOT / "weights" / "tinyi2v-demo"


def strip(path: Path) -> bool:
    """Remove outputs, execution counts and timings in place; True if anything changed."""
    import nbformat

    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    stripped = nbformat.writes(nb) + "\n"
    if stripped != text:
        path.write_text(stripped, encoding="utf-8")
    return stripped != text


def test_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_attention.ipynb", "02_flow_matching.ipynb",
                                           "03_animate.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             and (cell["outputs"] or cell["execution_count"] is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs; run "
                       "`python tests/test_notebooks.py --strip`")


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Environment variables the notebooks read: the model (the bundled one and its teacher if
    present), and an official-layout MobileI2V checkpoint + a VAE with matching channels."""
    torch = pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("notebooks")
    model = DEMO if (DEMO / "model_index.json").is_file() else make_tiny_model(tmp / "model")
    channels = read_json(model / "vae" / "config.json")["latent_channels"]
    cfg = official_config(in_channels=channels, hidden_size=72, num_blocks=2, softmax_blocks=(1,),
                          mlp_hidden_size=24, freq_dim=32)
    state = random_denoiser_params(cfg) | {"pos_embed": np.zeros((1, 4, 72), np.float32)}
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}},
               tmp / "hybrid_371.pth")
    teacher = ROOT / "weights" / "tinyi2v-teacher" if model == DEMO else tmp / "no-teacher"
    return {"TINYI2V_MODEL": str(model), "TINYI2V_TEACHER": str(teacher),
            "MOBILEI2V_PTH": str(tmp / "hybrid_371.pth"), "LTX_VAE": str(model / "vae")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, notebook_env, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in notebook_env.items():
        monkeypatch.setenv(name, value)                      # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    if path.name == "03_animate.ipynb":                      # the conversion cell ran
        assert "not found" not in json.dumps(nb.cells[-1].outputs)


if __name__ == "__main__":
    if sys.argv[1:] != ["--strip"]:
        sys.exit("usage: python tests/test_notebooks.py --strip")
    for notebook in NOTEBOOKS:
        if strip(notebook):
            print(f"stripped {notebook.relative_to(ROOT)}")
