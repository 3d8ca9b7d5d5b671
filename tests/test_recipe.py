"""Recipes (rlphf_cli.recipe): loading, one-line errors naming the file or the --set, precedence
(defaults < recipe < --set < flags), where a recipe is found, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import one_error_line, write_recipe
from typer.testing import CliRunner

from rlphf_cli.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train_policy:\n  lora:\n    r: sixteen\n", "train_policy.lora.r: expected an integer, got 'sixteen'"),
        ("train_policy:\n  lora:\n    lora_alhpa: 8\n", "train_policy.lora.lora_alhpa: unknown key (did you mean 'lora_alpha'?)"),
        ("preferences:\n  use: [P1A, concize]\n", "preferences.use.1: unknown preference 'concize'"),
        ("data:\n  train_prompts: missing.jsonl\n", "data.train_prompts: file not found: missing.jsonl"),
        ("train_policy: [unclosed\n", "invalid YAML"),
        ("train_policy:\n  algo: ppo\n", "train_policy.algo: expected one of"),
        ("modle:\n  name: tiny\n", "modle: unknown key (did you mean 'model'?)"),
    ],
)
def test_bad_recipe_is_one_line_naming_file_and_field(tmp_path, text, expected):
    path = write_recipe(tmp_path, text)
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_unknown_trl_field_is_named(tmp_path):
    path = write_recipe(tmp_path, "train_policy:\n  rloo:\n    lerning_rate: 0.1\n")
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "train_policy.rloo.lerning_rate: unknown RLOOConfig field (did you mean 'learning_rate'?)" in result.output


def test_set_override_error_names_the_override():
    result = runner.invoke(app, ["run", "--dry-run", "--set", "train_policy.lora.r=sixteen"])
    assert result.exit_code == 2
    assert "--set train_policy.lora.r: train_policy.lora.r: expected an integer" in result.output


def test_missing_recipe_file():
    result = runner.invoke(app, ["run", "nope/x.yaml", "--dry-run"])
    assert result.exit_code == 2
    assert "nope/x.yaml: recipe file not found" in result.output


@pytest.mark.parametrize("recipe", ["recipes/tiny.yaml", "recipes/psoups-paper.yaml", "tiny", "psoups-paper"])
def test_shipped_recipes_validate_and_dry_run(recipe):
    result = runner.invoke(app, ["run", recipe, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan:" in result.output and "train-policy" in result.output and "merge" in result.output


def test_precedence_defaults_recipe_set_flags(tmp_path):
    from rlphf_cli.cli.common import resolve_recipe

    path = write_recipe(tmp_path, "generate:\n  temperature: 0.7\n  top_k: 5\n")
    recipe = resolve_recipe(str(path), ["generate.temperature=0.3", "generate.max_new_tokens=9"],
                            generate__temperature=0.0, generate__top_p=None)
    assert recipe.generate.temperature == 0.0  # flag beats --set
    assert recipe.generate.max_new_tokens == 9  # --set beats recipe/defaults
    assert recipe.generate.top_k == 5  # recipe beats defaults
    assert recipe.generate.top_p == 1.0  # default; a flag that was not given does not override


def test_recipe_from_environment_and_cwd(tmp_path, monkeypatch):
    from rlphf_cli.recipe import find_recipe

    monkeypatch.chdir(tmp_path)
    assert find_recipe(None).name == "tiny.yaml"
    (tmp_path / "rlphf.yaml").write_text("name: local\n")
    assert find_recipe(None) == Path("rlphf.yaml")
    monkeypatch.setenv("RLPHF_RECIPE", str(write_recipe(tmp_path, "name: env\n")))
    assert find_recipe(None).name == "x.yaml"


def test_a_set_error_names_the_set_not_the_recipe_file():
    result = runner.invoke(app, ["run", "--dry-run", "--set", "train_rm.trl.learning_rat=1"])
    line = one_error_line(result, "train_rm.trl.learning_rat: unknown RewardConfig field (did you mean 'learning_rate'?)")
    assert line.startswith("error: --set train_rm.trl.learning_rat: ") and "tiny.yaml" not in line
    result = runner.invoke(app, ["run", "--dry-run", "--set", "train_rm.trl={learning_rat: 1}"])
    assert one_error_line(result, "unknown RewardConfig field").startswith("error: --set train_rm.trl: ")


def test_a_recipe_file_error_still_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train_rm:\n  trl:\n    learning_rat: 1\n")
    line = one_error_line(runner.invoke(app, ["run", str(path), "--dry-run"]), "unknown RewardConfig field")
    assert line.startswith(f"error: {path}: train_rm.trl.learning_rat")
