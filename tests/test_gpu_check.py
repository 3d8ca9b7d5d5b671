"""benchmarks/gpu_check.py (`make gpu-check`): one line and exit code 2 without CUDA; every step of the
check runs in its CPU rehearsal, so the script itself is tested before it meets a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU, even on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_it_stops_with_one_line():
    result = run(timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpu-check: no CUDA device here"), result.stderr


@pytest.mark.slow
def test_every_step_runs_in_the_cpu_rehearsal(tmp_path):
    result = run("--cpu-rehearsal", "--out", str(tmp_path / "check"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    for step in ("train-rm bf16", "train-policy rloo bf16", "train-policy dpo bf16"):
        assert figures[step]["s_per_step"] > 0 and figures[step]["tokens_per_s"] > 0, step
    for step in ("generate base", "generate soup P2A+P3A", "gemma generate P2A"):
        assert figures[step]["tokens_per_s"] > 0
    for step in ("gemma train-rm bf16", "gemma train-policy rloo bf16"):  # Gemma's steps, on tiny-random here
        assert figures[step]["s_per_step"] > 0, step
    # Optional parts run where their packages are, and say why not elsewhere.
    for step in ("train-rm qlora 4-bit", "train-policy rloo qlora 4-bit", "serve"):
        if figures[step] is None:
            assert f"{step:<31}" in result.stdout and "skipped: " in result.stdout
    print(result.stdout[result.stdout.index("gpu-check on"):])
