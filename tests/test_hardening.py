"""Issue 14: no library traceback for any input; flags read as flags; one error line, nothing before it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rlphf_cli.cli.main import app

runner = CliRunner()
COMMANDS = ["tiny-model", "generate", "annotate", "train-rm", "train-policy", "merge", "judge", "run"]


def only_error_line(result, expected: str) -> str:
    """Exit 2 and exactly one line, `error: ...`, with nothing (no empty line) before it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, repr(result.output)
    assert expected in result.output, result.output
    return result.output.strip()


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
        (["annotate"], "rollouts not found"),
        (["train-rm", "--pref", "concise"], "annotations for concise not found"),
        (["train-policy", "--pref", "concise"], "reward model for concise not found"),
        (["merge", "--prefs", "concise,friendly"], "policy for P2A (concise) not found"),
        (["judge", "--a", "nowhere-a.jsonl", "--b", "nowhere-b.jsonl"], "generations not found"),
        (["generate", "--prompts", "nowhere.jsonl"], "nowhere.jsonl: file not found"),
    ],
)
def test_no_empty_line_before_an_error(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    only_error_line(runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run")]), expected)


def test_a_set_error_names_the_set_not_the_recipe_file():
    result = runner.invoke(app, ["run", "--dry-run", "--set", "train_rm.trl.learning_rat=1"])
    line = only_error_line(result, "train_rm.trl.learning_rat: unknown RewardConfig field (did you mean 'learning_rate'?)")
    assert line.startswith("error: --set train_rm.trl.learning_rat: ") and "tiny.yaml" not in line
    result = runner.invoke(app, ["run", "--dry-run", "--set", "train_rm.trl={learning_rat: 1}"])
    assert only_error_line(result, "unknown RewardConfig field").startswith("error: --set train_rm.trl: ")


def test_a_recipe_file_error_still_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train_rm:\n  trl:\n    learning_rat: 1\n")
    line = only_error_line(runner.invoke(app, ["run", str(path), "--dry-run"]), "unknown RewardConfig field")
    assert line.startswith(f"error: {path}: train_rm.trl.learning_rat")
