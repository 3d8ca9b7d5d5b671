"""The command contract: help for every command (fast, flags read as flags), the version, one-line
errors (a traceback only with --debug), errors that cross a worker process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import one_error_line, write_recipe
from typer.testing import CliRunner

from rlphf_cli.cli.main import app

runner = CliRunner()


COMMANDS = ["tiny-model", "generate", "annotate", "train-rm", "train-policy", "merge", "judge", "run", "serve"]


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"rlphf {command}" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("rlphf ")


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, time; t=time.time(); from rlphf_cli.cli.main import app; print('torch' in sys.modules)"
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    start = time.time()
    subprocess.run([sys.executable, "-m", "rlphf_cli", "--help"], capture_output=True, check=True)
    assert time.time() - start < 2.0  # the bar is 1 s; leave room for a loaded CI machine


def test_debug_shows_traceback(tmp_path):
    path = write_recipe(tmp_path, "seed: x\n")
    result = runner.invoke(app, ["--debug", "run", str(path), "--dry-run"])
    assert result.exit_code != 0 and result.exception is not None


def test_missing_artifact_error_survives_a_worker_process():
    import pickle

    from rlphf_cli.errors import MissingArtifactError

    error = pickle.loads(pickle.dumps(MissingArtifactError("reward model", "runs/x/rm/P2A", "rlphf train-rm --pref P2A")))
    assert str(error).endswith("make it with: rlphf train-rm --pref P2A") and error.command.startswith("rlphf")


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_flags_read_as_flags_in_help(command):
    result = runner.invoke(app, [command, "--help"] if command else ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    flags = [line for line in result.output.splitlines() if "--help" in line or "--force" in line or "--resume" in line]
    assert flags and all("<" not in line.split("  ")[0] for line in flags)


def test_a_flag_takes_no_value():
    result = runner.invoke(app, ["run", "--dry-run", "true"])
    assert result.exit_code == 2  # 'true' is read as the recipe argument, not as the flag's value
    assert "true: recipe file not found" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["annotate", "--no-deps"], "1 input missing: rollouts ("),
        (["train-rm", "--pref", "concise", "--no-deps"], "2 inputs missing: rollouts"),
        (["train-policy", "--pref", "concise", "--no-deps"], "3 inputs missing: rollouts"),
        (["merge", "--prefs", "concise,friendly", "--no-deps"], "train-policy/P2A ("),
        (["judge", "--a", "nowhere-a.jsonl", "--b", "nowhere-b.jsonl"], "generations not found"),
        (["generate", "--prompts", "nowhere.jsonl"], "nowhere.jsonl: file not found"),
    ],
)
def test_no_empty_line_before_an_error_and_no_run_directory_made(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    one_error_line(runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run")]), expected)
    assert list(tmp_path.iterdir()) == []  # validation failed: nothing written, not even recipe.yaml
