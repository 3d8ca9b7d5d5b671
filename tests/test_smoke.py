"""Smoke runs (rlphf_cli.smoke): the smoke recipe, `rlphf run smoke` and `--smoke` on any recipe."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml
from helpers import PIRATE, PIRATE_TEMPLATE
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.pipeline import STAGE_NAMES
from rlphf_cli.recipe import EvaluationSection, builtin_recipes_dir, load_recipe
from rlphf_cli.runs import read_jsonl
from rlphf_cli.smoke import load_smoke_recipe
from rlphf_cli.specs import TRAINERS

runner = CliRunner()
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


# --------------------------------------------------------------------------------------------
# --smoke on any recipe


def test_the_smoke_recipe_covers_every_baseline_and_cuts_every_trainer():
    smoke = load_recipe("smoke")
    (systems,) = typing.get_args(EvaluationSection.model_fields["baselines"].annotation)
    assert set(smoke.evaluation.baselines) == set(typing.get_args(systems))  # so every stage runs
    cut = load_smoke_recipe("psoups-paper")
    for loc in (t.section for t in TRAINERS.values()):  # --smoke can cut every trainer down to a few steps
        section, sub = loc.split(".")
        assert getattr(getattr(smoke, section), sub)["max_steps"] <= 2, loc
        assert getattr(getattr(cut, section), sub).get("max_steps") == getattr(getattr(smoke, section), sub)["max_steps"]


def test_smoke_takes_the_smoke_recipe_sizes_and_keeps_the_recipe_own_settings():
    tiny = load_recipe(RECIPES / "tiny.yaml")
    smoke = load_recipe(builtin_recipes_dir() / "smoke.yaml")
    cut = load_smoke_recipe(RECIPES / "tiny.yaml")
    assert cut.model.name == "tiny-random" and cut.resolved_run_dir() == Path("runs/tiny-smoke")
    assert cut.annotate.judge == cut.judge.backend == "coin"
    assert cut.data.max_train_prompts == smoke.data.max_train_prompts
    assert cut.train_policy.rloo["max_steps"] == smoke.train_policy.rloo["max_steps"]
    assert cut.train_rm.trl["max_steps"] == smoke.train_rm.trl["max_steps"] and "num_train_epochs" not in cut.train_rm.trl
    # The recipe's own: preferences, learning rates, LoRA, sweep preferences, baselines.
    assert cut.preference_set().names() == tiny.preference_set().names()
    assert cut.train_policy.rloo["learning_rate"] == tiny.train_policy.rloo["learning_rate"]
    assert cut.train_policy.lora == tiny.train_policy.lora and cut.evaluation.baselines == tiny.evaluation.baselines
    # Explicit --set and flags win over the smoke sizes.
    mine = load_smoke_recipe(RECIPES / "tiny.yaml", ["train_policy.rloo.max_steps=3", "judge.backend=rubric"],
                             {"run_dir": "elsewhere"})
    assert mine.train_policy.rloo["max_steps"] == 3 and mine.judge.backend == "rubric"
    assert mine.annotate.judge == "coin" and mine.resolved_run_dir() == Path("elsewhere")


def test_smoke_makes_a_gpu_recipe_runnable_on_cpu():
    cut = load_smoke_recipe("psoups-paper")
    for section in (cut.train_rm.trl, cut.train_policy.rloo):
        assert not {"bf16", "gradient_accumulation_steps", "use_vllm"} & set(section)
    assert cut.model.dtype == "auto" and cut.model.prompt_format == "tulu"  # the recipe's prompt format stays
    assert cut.judge.backend == "coin" and cut.resolved_run_dir() == Path("runs/psoups-paper-smoke")


# --------------------------------------------------------------------------------------------
# Whole runs (seconds each; `benchmarks/smoke_time.py` times them in fresh processes)


@pytest.mark.slow
def readme_smoke_command() -> list[str]:
    """The README's CI example (section 'CI smoke runs'): its line for the built-in smoke recipe."""
    readme = (RECIPES.parent / "README.md").read_text()
    block = readme.split("\n## CI smoke runs\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    lines = [line.split("- run: ", 1)[1].split("#", 1)[0].split() for line in block.splitlines()
             if "- run: rlphf " in line and "the built-in smoke recipe" in line]
    assert len(lines) == 1, block
    return lines[0]


def test_run_smoke_from_an_empty_home_runs_every_stage(home, monkeypatch):
    command = readme_smoke_command()  # the README's line, as written
    assert command[:2] == ["rlphf", "run"]
    monkeypatch.setenv("RLPHF_PROGRESS_SECONDS", "0")  # a progress line every 50 ms (the output is not a terminal)
    result = runner.invoke(app, command[1:])
    assert result.exit_code == 0, result.output
    _progress_lines_name_the_unit_and_count_its_steps(result.output)
    run = Path("runs/smoke")
    ended = {json.loads(line)["stage"] for line in (run / "events.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "end"}
    assert ended == set(STAGE_NAMES) - {"pareto"}  # every stage ran, the built-in model's included; pareto is off
    assert any(p.name.startswith("tiny-random-") for p in home.iterdir())
    for name in ("soups/P1A+P2A/soup.json", "policy/morl/adapter_model.safetensors", "rm/general/metrics.json",
                 "judgments/psoups_vs_base.json", "report/sweep.png"):
        assert (run / name).exists(), name
    report = (run / "report" / "report.md").read_text()
    assert report.splitlines()[2].startswith("> **WARNING: the base model tiny-random has random weights")
    assert "coin" not in report and "## Checks" not in report  # the rubric judged; no check on random numbers
    assert "WARNING: the base model tiny-random has random weights" in result.output
    # Its policies trained: each answers (greedy) otherwise than the others and the base model.
    answers = {}
    for name in ("base", "P1A", "P2A", "P2B"):
        out = Path(f"greedy-{name}.jsonl")
        adapter = [] if name == "base" else ["--adapter", str(run / "policy" / name)]
        done = runner.invoke(app, ["generate", "--run-dir", str(run), *adapter, "--prefs", "none", "--system", name,
                                   "--temperature", "0", "--limit", "4", "--out", str(out)])
        assert done.exit_code == 0, done.output
        answers[name] = tuple(record["response"] for record in read_jsonl(out))
    assert len(set(answers.values())) == 4, answers


def _progress_lines_name_the_unit_and_count_its_steps(output: str) -> None:
    """A stage shows its elapsed time and no time left (stages differ 1000x in length, so the pace of
    the first ones says nothing of the next); a unit shows which of the stage's units it is; a
    training unit counts its steps, with a time left."""
    import re

    ticks = [line for line in output.splitlines() if line.startswith("stage ")]
    assert ticks, output
    for line in ticks:
        stage, *shown = line.split(" | ")
        assert re.fullmatch(r"stage \d+/10: [a-z-]+, \dm\d\ds elapsed", stage), line
        assert len(shown) <= 2, line
    policy = [line.split(" | ")[1:] for line in ticks if line.startswith("stage 5/10: train-policy")]
    assert {shown[0] for shown in policy if shown} <= {"P1A (1/3)", "P2A (2/3)", "P2B (3/3)"}, policy
    assert any(re.fullmatch(r"steps: 1/2 \(50%\), \dm\d\ds elapsed, ~\dm\d\ds left", shown[-1])
               for shown in policy if len(shown) == 2), policy


@pytest.mark.slow
def test_tiny_recipe_with_smoke_exercises_its_own_preferences_with_the_coin_judge(home):
    result = runner.invoke(app, ["run", str(RECIPES / "tiny.yaml"), "--smoke"])
    assert result.exit_code == 0, result.output
    assert "smoke run of" in result.output and "runs/tiny-smoke" in result.output
    assert not Path("runs/tiny").exists()  # the recipe's real run is never touched
    run = Path("runs/tiny-smoke")
    for pref in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B"):
        assert read_jsonl(run / "annotations" / f"{pref}.jsonl"), pref  # coin labels: no pair dropped as a tie
        assert (run / "policy" / pref / "adapter_model.safetensors").exists()
    assert (run / "soups" / "P1A+P2A+P3A" / "soup.json").exists()
    report = (run / "report" / "report.md").read_text()
    assert "> **WARNING: the coin judge decided annotation and evaluation" in report.split("## ")[0]
    assert "WARNING: the coin judge" in result.output
    assert yaml.safe_load((run / "recipe.yaml").read_text())["judge"]["backend"] == "coin"


def _pirate_recipe(tmp_path: Path, evaluate_template: str) -> Path:
    """A user's recipe: a defined preference with its own templates, judged by an LLM endpoint."""
    folder = tmp_path / "my-templates"
    folder.mkdir(exist_ok=True)
    (folder / "P9X_annotate.txt").write_text(PIRATE_TEMPLATE)
    (folder / "P9X_evaluate.txt").write_text(evaluate_template)
    recipe = {"name": "pirates", "preferences": {"use": ["P2A", "P9X"], "define": [PIRATE]},
              "annotate": {"judge": "openai"},
              "judge": {"backend": "openai", "templates": str(folder), "openai": {"base_url": "http://127.0.0.1:9"}},
              "merge": {"method": "ties", "density": 0.5},
              "evaluation": {"baselines": ["base"], "sweep": None}}
    path = tmp_path / "pirates.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_defined_preference_and_own_templates_run_through_the_coin_judge(home, tmp_path):
    result = runner.invoke(app, ["run", str(_pirate_recipe(tmp_path, PIRATE_TEMPLATE + " Or TIE.")), "--smoke"])
    assert result.exit_code == 0, result.output
    run = Path("runs/pirates-smoke")
    summary = json.loads((run / "annotations" / "P9X.summary.json").read_text())
    assert summary["judge"]["backend"] == "coin" and summary["written"] > 0
    assert json.loads((run / "soups" / "P2A+P9X" / "soup.json").read_text())["method"] == "ties"
    judged = json.loads((run / "judgments" / "psoups_vs_base.json").read_text())
    assert "P9X" in judged["per_criterion"]


def test_a_broken_template_fails_the_smoke_run_with_one_line(home, tmp_path):
    result = runner.invoke(app, ["run", str(_pirate_recipe(tmp_path, "{instruction} {output_a} {outptu_b}")), "--smoke"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "P9X_evaluate.txt: unknown placeholder {outptu_b} (did you mean 'output_b'?)" in errors[0]


@pytest.mark.slow
def test_gemma_recipe_with_smoke_runs_every_stage(home):
    """The real-model recipe's own stages (two dimensions, soups, the P2A/P2B sweep) on tiny-random,
    without the extra: --smoke swaps the model."""
    result = runner.invoke(app, ["run", "gemma-270m", "--smoke"])
    assert result.exit_code == 0, result.output
    run = Path("runs/gemma-270m-smoke")
    for pref in ("P2A", "P2B", "P3A"):
        assert (run / "policy" / pref / "adapter_model.safetensors").exists()
    for soup in ("P2A+P3A", "P2B+P3A"):
        assert (run / "soups" / soup / "soup.json").exists()
    assert (run / "report" / "report.md").exists()
