"""The command contract: help for every command, recipe errors, aliases, run directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


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
    path = write(tmp_path, text)
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_unknown_trl_field_is_named(tmp_path):
    path = write(tmp_path, "train_policy:\n  rloo:\n    lerning_rate: 0.1\n")
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


def test_debug_shows_traceback(tmp_path):
    path = write(tmp_path, "seed: x\n")
    result = runner.invoke(app, ["--debug", "run", str(path), "--dry-run"])
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.parametrize("recipe", ["recipes/tiny.yaml", "recipes/psoups-paper.yaml", "tiny", "psoups-paper"])
def test_shipped_recipes_validate_and_dry_run(recipe):
    result = runner.invoke(app, ["run", recipe, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan:" in result.output and "train-policy" in result.output and "merge" in result.output


def test_precedence_defaults_recipe_set_flags(tmp_path):
    from rlphf_cli.cli.common import resolve_recipe

    path = write(tmp_path, "generate:\n  temperature: 0.7\n  top_k: 5\n")
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
    monkeypatch.setenv("RLPHF_RECIPE", str(write(tmp_path, "name: env\n")))
    assert find_recipe(None).name == "x.yaml"


def test_aliases_and_ids_are_interchangeable():
    from rlphf_cli.preferences import PreferenceSet, combination_name

    prefs = PreferenceSet.catalog()
    assert prefs.get("concise") is prefs.get("P2A") is prefs.get("p2a")
    assert [p.id for p in prefs.resolve("elementary,P2A,friendly")] == ["P1A", "P2A", "P3A"]
    assert len(prefs.combinations()) == 8
    assert combination_name(prefs.parse_combination("elementary+concise+P3B")) == "P1A+P2A+P3B"
    assert prefs.get("P2B").prompt == (
        "Generate a response that is very informative, without missing any background information."
    )
    with pytest.raises(Exception, match="did you mean 'concise'"):
        prefs.get("consise")


def test_user_defined_preferences_join_the_catalog(tmp_path):
    from rlphf_cli.recipe import load_recipe

    path = write(tmp_path, """
preferences:
  use: [P1A, concise, formal, casual]
  define:
    - {id: P4A, alias: formal, dimension: register, prompt: Be formal., criterion: "Which is more formal?"}
    - {id: P4B, alias: casual, dimension: register, prompt: Be casual., criterion: "Which is more casual?"}
""")
    prefs = load_recipe(str(path)).preference_set()
    assert [p.id for p in prefs] == ["P1A", "P2A", "P4A", "P4B"]
    assert len(prefs.combinations()) == 2


def test_run_directory_writes_recipe_and_env_and_no_secret(tmp_path, monkeypatch):
    from rlphf_cli.jobs import run_record
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.runs import RunDir, atomic_write_text

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-super-secret-value")
    recipe = load_recipe("psoups-paper", [f"run_dir={tmp_path / 'run'}"])
    run = RunDir.open(recipe.resolved_run_dir(), run_record(recipe))
    with run.stage("annotate", pref="P2A") as info:
        info["pairs"] = 3
    atomic_write_text(run.path("annotations", "P2A.jsonl"), "{}\n")
    assert (run.root / "recipe.yaml").exists()
    env = json.loads((run.root / "env.json").read_text())
    assert {"torch", "transformers", "trl", "peft"} <= set(env["versions"]) and env["seed"] == 42
    assert "OPENAI_API_KEY" in (run.root / "recipe.yaml").read_text()  # the variable's name only
    events = run.events()
    assert [e["event"] for e in events] == ["start", "end"] and events[1]["outcome"] == "ok"
    for file in run.root.rglob("*"):
        if file.is_file():
            assert "sk-test-super-secret-value" not in file.read_text()
    assert not list(run.root.rglob(".*.tmp-*"))


def test_stage_markers_and_atomic_dir(tmp_path):
    from rlphf_cli.runs import RunDir, atomic_dir, fingerprint

    run = RunDir.open(tmp_path / "run")
    key = fingerprint({"inputs": [1, 2]})
    assert not run.is_done("train-rm/P2A", key)
    run.mark_done("train-rm/P2A", key)
    assert run.is_done("train-rm/P2A", key)
    assert not run.is_done("train-rm/P2A", fingerprint({"inputs": [1, 3]}))
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "run"]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "whole.txt").write_text("x")
    assert (tmp_path / "out" / "whole.txt").exists()
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "run").stat().st_mode & 0o777  # not 0700


def test_missing_artifact_error_survives_a_worker_process():
    import pickle

    from rlphf_cli.errors import MissingArtifactError

    error = pickle.loads(pickle.dumps(MissingArtifactError("reward model", "runs/x/rm/P2A", "rlphf train-rm --pref P2A")))
    assert str(error).endswith("make it with: rlphf train-rm --pref P2A") and error.command.startswith("rlphf")


def test_fixture_model_loads_with_auto_classes(tiny_random_model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model)
    AutoModelForCausalLM.from_pretrained(tiny_random_model)
    AutoModelForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi\n<|assistant|>\n"
