"""The first hour of a new user: the run directory's recipe, the first line of every command, stage
commands whose inputs are missing (made as `rlphf run` makes them; --no-deps lists them once)."""

from __future__ import annotations

import pytest
from helpers import RECIPE_LINE, one_error_line
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.recipe import load_recipe

runner = CliRunner()


def first_line(result) -> str:
    return result.output.splitlines()[0] if result.output else ""


def test_a_run_directory_runs_on_its_recipe_and_the_first_line_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "mine-run"
    run.mkdir()
    recipe = load_recipe("smoke", ["name=mine"])
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    result = runner.invoke(app, ["merge", "--weights", "0.5,0.5", "--run-dir", str(run)])
    assert first_line(result) == f"recipe mine ({run / 'recipe.yaml'}), run dir {run}"
    # The smoke recipe's preferences (P1A, P2A, P2B), not the built-in tiny recipe's six.
    one_error_line(result, "has no trained policy", "--soup elementary=0.5,concise=0.5")
    # --recipe still wins over the run directory's recipe.
    result = runner.invoke(app, ["merge", "--weights", "0.5,0.5", "--run-dir", str(run), "--recipe", "tiny"])
    assert first_line(result) == f"recipe tiny (built-in), run dir {run}"


@pytest.mark.parametrize("command", [["train-rm", "--pref", "concise", "--no-deps"],
                                     ["train-rm", "--prefs", "concise", "--no-deps"]])
def test_missing_inputs_are_listed_once_with_the_command_that_makes_them(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rlphf_cli.cli.common.ARGV", command)
    result = runner.invoke(app, command)
    assert RECIPE_LINE.match(result.output), result.output
    line = one_error_line(result, "2 inputs missing", "rollouts (runs/tiny/rollouts.jsonl)",
                          "annotate/P2A (runs/tiny/annotations/P2A.jsonl)")
    assert line.endswith(f"go on with: rlphf {' '.join(command[:-1])}"), line
    assert list(tmp_path.iterdir()) == []


def test_a_soup_of_policies_not_trained_yet_lists_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = ["merge", "--soup", "concise=0.5,friendly=0.5", "--no-deps"]
    monkeypatch.setattr("rlphf_cli.cli.common.ARGV", command)
    line = one_error_line(runner.invoke(app, command), "7 inputs missing", "train-rm/P3A (runs/tiny/rm/P3A)",
                          "train-policy/P2A (runs/tiny/policy/P2A)", "train-policy/P3A (runs/tiny/policy/P3A)")
    assert line.endswith("go on with: rlphf merge --soup concise=0.5,friendly=0.5"), line


@pytest.mark.slow
def test_missing_inputs_are_made_as_rlphf_run_makes_them(tmp_path, monkeypatch, tiny_random_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLPHF_SMOKE", "1")
    result = runner.invoke(app, ["train-rm", "--pref", "concise"])
    assert result.exit_code == 0, result.output
    assert first_line(result) == "recipe tiny-smoke (built-in), run dir runs/tiny-smoke"
    assert (tmp_path / "runs/tiny-smoke/rm/P2A/adapter_config.json").is_file()
    # `rlphf run` finds the units the command ran finished: same jobs, same fingerprints.
    from rlphf_cli.cli.common import resolve_recipe
    from rlphf_cli.pipeline import Pipeline

    recipe = resolve_recipe(None, None, announce=False)
    summary = Pipeline(recipe).execute(keys={"rollouts", "annotate/P2A"})
    assert [summary["stages"][s]["ran"] for s in ("rollouts", "annotate")] == [0, 0]
    assert not (tmp_path / "runs/tiny-smoke/annotations/P3A.jsonl").exists()  # nothing it did not need


def test_a_stopped_generate_outside_a_run_directory_is_not_started_over(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere" / "answers.jsonl"
    out.parent.mkdir()
    kept = '{"id": "1", "responses": ["a"]}\n{"id": "2", "responses": ["b"]}\n'
    out.write_text(kept)
    result = runner.invoke(app, ["generate", "--recipe", "smoke", "--out", str(out), "--limit", "1"])
    one_error_line(result, f"{out}: exists (2 records", "--resume continues it, --force replaces it")
    assert out.read_text() == kept


def test_a_long_step_with_piped_output_prints_progress_lines(tmp_path):
    """Output to a pipe draws no bar: a line per interval (RLPHF_PROGRESS_SECONDS) with done/total,
    the time elapsed and the time left, and the last state of a lasting display."""
    import os
    import re
    import subprocess
    import sys

    step = ("import time\n"
            "from rlphf_cli.cli.common import progress_bar\n"
            "with progress_bar('steps', transient=False) as bar:\n"
            "    task = bar.add_task('training P2A', total=4)\n"
            "    for done in range(1, 5):\n"
            "        time.sleep(0.4)\n"
            "        bar.update(task, completed=done)\n")
    done = subprocess.run([sys.executable, "-c", step], capture_output=True, text=True,
                          env={**os.environ, "RLPHF_PROGRESS_SECONDS": "0.1"}, timeout=60, check=True)
    lines = done.stdout.splitlines()
    ticks = [line for line in lines if re.fullmatch(r"training P2A: [0-3]/4 \(\d+%\), 0m0\ds elapsed(, ~0m0\ds left)?",
                                                    line)]
    assert len(ticks) >= 5, done.stdout
    assert any(line.endswith("left") for line in ticks), done.stdout  # once a step is done, the time left
    assert lines[-1].startswith("training P2A: 4/4 (100%), "), done.stdout
    assert "━" not in done.stdout  # no bar drawn into the pipe


def _commands():
    return [(c.name or c.callback.__name__, c.callback) for c in app.registered_commands]


@pytest.mark.parametrize(("name", "callback"), _commands(), ids=[n for n, _ in _commands()])
def test_help_at_80_columns_keeps_every_example_on_one_line(name, callback):
    import re

    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    for example in re.findall(r"\[bold\](rlphf [^\[]+)\[/\]", callback.__doc__ or ""):
        assert any(example in line for line in lines), (example, result.output)


def test_help_lists_what_options_accept():
    from rlphf_cli.judges import JUDGES
    from rlphf_cli.pipeline import STAGE_NAMES

    judged = runner.invoke(app, ["judge", "--help"], env={"COLUMNS": "200"}).output
    assert all(name in judged for name in JUDGES.names())
    ran = " ".join(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    assert ran.count(", ".join(STAGE_NAMES)) == 2  # --only and --from
    trained = " ".join(runner.invoke(app, ["train-policy", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "--prefs,--pref" in trained
    assert "no default: required in mode soup" in trained


def quick_start_lines() -> list[str]:
    """The README's quick start: the `rlphf` lines of the first bash block under '## Quick start'."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("rlphf ")]


def test_the_quick_start_promises_the_lines():
    lines = quick_start_lines()
    assert lines[:3] == ["rlphf train-policy --pref concise", "rlphf train-policy --pref friendly",
                         "rlphf merge --weights 0.5,0.5"]


@pytest.mark.slow
def test_the_first_hour_follows_the_quick_start_literally(tmp_path, monkeypatch, tiny_random_model):
    """Each line of the README's quick start, as written, in an empty folder (smoke sizes through
    RLPHF_SMOKE): exit code 0 and a first line naming the recipe and the run directory."""
    import shlex

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLPHF_SMOKE", "1")
    for line in quick_start_lines():
        result = runner.invoke(app, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
        assert first_line(result) == "recipe tiny-smoke (built-in), run dir runs/tiny-smoke", (line, result.output)
        if line.startswith("rlphf merge"):
            assert "merging the run's policies: concise=0.5,friendly=0.5" in result.output
    assert (tmp_path / "runs/tiny-smoke/soups/P2A+P3A/adapter_model.safetensors").is_file()
    # The run directory's own recipe (already smoke-sized) is not cut twice.
    again = runner.invoke(app, ["merge", "--weights", "0.5,0.5", "--run-dir", "runs/tiny-smoke", "--force"])
    assert again.exit_code == 0, again.output
    assert first_line(again) == "recipe tiny-smoke (runs/tiny-smoke/recipe.yaml), run dir runs/tiny-smoke"
