"""train/gpu_run.sh and train/gpu_continue.sh, which only ever run on a lent GPU: executed by
bash with a `python` on PATH that records its arguments instead of training, then every recorded
`python -m train.X ...` is parsed by that stage's own command line. A misspelt or removed flag, a
stage that no longer exists or a shell error fails here rather than on the GPU's clock."""
from __future__ import annotations

import importlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["train/gpu_run.sh", "train/gpu_continue.sh"]


def recorded_commands(script: str, tmp_path: Path, smoke: bool) -> list[list[str]]:
    """Every stage of `script`, the optional ones included (DECODER=1)."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    calls = tmp_path / f"calls-{smoke}"                      # a file per call: the scripts run
    calls.mkdir()                                            # stages concurrently
    (shim / "python").write_text('#!/bin/sh\nf=$(mktemp "$CALLS/call.XXXXXX")\n'
                                 'for a in "$@"; do printf "%s\\t" "$a"; done > "$f"\n')
    (shim / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "SMOKE": "1" if smoke else "0", "DECODER": "1"}
    subprocess.run(["bash", script, "CACHE", str(tmp_path / "runs")], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True, timeout=60)
    return [f.read_text().rstrip("\t").split("\t") for f in sorted(calls.iterdir())]


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_stage_command_parses(script, smoke, tmp_path):
    commands = recorded_commands(script, tmp_path, smoke)
    assert len(commands) == 4, commands                      # four stages in each script
    for argv in commands:
        assert argv[0] == "-m" and argv[1].startswith("train."), shlex.join(argv)
        stage = importlib.import_module(argv[1])
        try:
            stage.build_parser().parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"{script}: `python {shlex.join(argv)}` does not parse")

