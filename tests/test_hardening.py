"""Issue 14: no library traceback for any input; flags read as flags; one error line, nothing before it."""

from __future__ import annotations

from pathlib import Path

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
def test_no_empty_line_before_an_error_and_no_run_directory_made(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    only_error_line(runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run")]), expected)
    assert list(tmp_path.iterdir()) == []  # validation failed: nothing written, not even recipe.yaml


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


# --------------------------------------------------------------------------------------------
# Every input file: not UTF-8, truncated, empty, of the wrong shape -> one line naming the file

GENERATION = '{"id": "p0", "instruction": "x", "preferences": ["P2A"], "combo": "P2A", "response": "a"}\n'
FAULTS = {
    # kind: {fault: (file content, expected fragment after the path)}
    "prompts": {
        "utf8": (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', "line 2: not UTF-8 text"),
        "truncated": (b'{"prompt": "a"}\n{"prompt": "b', "line 2: invalid JSON"),
        "empty": (b"", "empty file"),
        "schema": (b'{"prompt": "a"}\n{"text": "b"}\n', "line 2: a prompt record needs"),
    },
    "rollouts": {
        "utf8": (b'{"instruction": "\xff", "responses": ["a", "b"]}\n', "line 1: not UTF-8 text"),
        "truncated": (b'{"instruction": "x", "responses": ["a", "b"]}\n{"instruction": "y", "resp', "line 2: invalid JSON"),
        "empty": (b"\n", "empty file"),
        "schema": (b'{"instruction": "x", "responses": "ab"}\n', "line 1: a rollout needs"),
    },
    "annotations": {
        "utf8": (b'{"prompt": "x", "chosen": "\xfe", "rejected": "b"}\n', "line 1: not UTF-8 text"),
        "truncated": (b'{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "x", "cho', "line 2: invalid JSON"),
        "empty": (b"", "empty file"),
        "schema": (b'{"prompt": "x", "chosen": 1, "rejected": "b"}\n', "line 1: a preference pair needs"),
    },
    "generations": {
        "utf8": (GENERATION.encode() + b'{"id": "p1", "response": "\xff"}\n', "line 2: not UTF-8 text"),
        "truncated": (GENERATION.encode() + b'{"id": "p1", "respo', "line 2: invalid JSON"),
        "empty": (b"", "empty file"),
        "schema": (b'["p0", "a"]\n', "line 1: expected a generation object, got a list"),
    },
    "recipe": {
        "utf8": (b"name: caf\xe9\n", "line 1: not UTF-8 text"),
        "truncated": (b"name: x\nmodel: {name: tiny\n", "invalid YAML (line 3"),
        "empty": (b"", "empty file"),
        "schema": (b"- name\n- tiny\n", "expected a mapping"),
    },
    "template": {
        "utf8": (b"Which? {instruction}\n\xff {output_a} {output_b}\n", "line 2: not UTF-8 text"),
        "truncated": (b"Which? {instruction}\n## Output (a)\n{output_a}\n## Outp", "has no {output_b}"),
        "empty": (b"  \n", "empty file"),
        "schema": (b"Which is better, a or b?\n", "has no {instruction}"),
    },
    "adapter_config": {
        "utf8": (b'{"peft_type": "LORA", "r": 4, "note": "\xff"}', "line 1: not UTF-8 text"),
        "truncated": (b'{"peft_type": "LORA",\n "r": 4, "lora_al', "line 2: invalid JSON"),
        "empty": (b"", "empty file"),
        "schema": (b"[4, 8]", "expected a JSON object"),
    },
}


def _invoke_with_bad(kind: str, bad: Path, tmp_path: Path, model: Path):
    run = ["--run-dir", str(tmp_path / "run")]
    if kind == "prompts":
        return runner.invoke(app, ["generate", "--prompts", str(bad), "--model", str(model), "--out",
                                   str(tmp_path / "o.jsonl"), *run])
    if kind == "rollouts":
        return runner.invoke(app, ["annotate", "--rollouts", str(bad), "--out", str(tmp_path / "ann"), *run])
    if kind == "annotations":
        return runner.invoke(app, ["train-rm", "--pref", "P2A", "--data", str(bad), "--model", str(model),
                                   "--out", str(tmp_path / "rm"), *run])
    good = tmp_path / "good.jsonl"
    good.write_text(GENERATION)
    if kind == "generations":
        return runner.invoke(app, ["judge", "--a", str(good), "--b", str(bad), "--out", str(tmp_path / "j.json"), *run])
    if kind == "recipe":
        return runner.invoke(app, ["run", str(bad), "--dry-run"])
    if kind == "template":
        # The rubric judge reads no template; the openai one reads them all before asking anything.
        return runner.invoke(app, ["judge", "--a", str(good), "--b", str(good), "--out", str(tmp_path / "j.json"),
                                   "--judge", "openai", "--set", "judge.openai.base_url=http://127.0.0.1:9/v1",
                                   "--set", f"judge.templates={bad.parent}", *run])
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    return runner.invoke(app, ["merge", str(bad.parent), str(other), "--out", str(tmp_path / "soup"), *run])


@pytest.mark.parametrize("fault", ["utf8", "truncated", "empty", "schema"])
@pytest.mark.parametrize("kind", list(FAULTS))
def test_every_input_file_fault_is_one_line_naming_the_file(kind, fault, tmp_path, tiny_random_model):
    name = {"template": "templates/P2A_evaluate.txt", "adapter_config": "adapter/adapter_config.json",
            "recipe": "recipe.yaml"}.get(kind, f"{kind}.jsonl")
    bad = tmp_path / name
    bad.parent.mkdir(parents=True, exist_ok=True)
    content, expected = FAULTS[kind][fault]
    bad.write_bytes(content)
    line = only_error_line(_invoke_with_bad(kind, bad, tmp_path, tiny_random_model), expected)
    assert line.startswith(f"error: {bad}: "), line
    assert not (tmp_path / "run").exists()  # nothing written for an input that does not read


# --------------------------------------------------------------------------------------------
# Greedy decoding and the sample count, decided in one place


def test_greedy_without_a_sample_count_just_works_with_one_sample(tiny_random_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Explain gravity."}\n{"prompt": "Hi."}\n')
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--temperature", "0", "--prompts", str(prompts), "--out", str(out),
                                 "--model", str(tiny_random_model), "--max-new-tokens", "4",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "greedy decoding (temperature 0): one response per prompt" in result.output
    from rlphf_cli.runs import read_jsonl

    assert [len(r["responses"]) for r in read_jsonl(out)] == [1, 1]


@pytest.mark.parametrize(("args", "expected"), [
    (["--temperature", "0", "--num-samples", "3", "--prefs", "P2A"], "--num-samples 3 with --temperature 0"),
    (["--set", "generate.temperature=0", "--num-samples", "2"], "--num-samples 2 with --set generate.temperature 0"),
    (["--temperature", "0", "--set", "generate.num_samples=2"], "--set generate.num_samples 2 with --temperature 0"),
])
def test_an_explicit_sample_count_with_greedy_decoding_is_one_line(tmp_path, args, expected):
    only_error_line(runner.invoke(app, ["generate", *args, "--run-dir", str(tmp_path / "run")]), expected)
    assert not (tmp_path / "run").exists()


def test_the_sample_count_rules():
    from rlphf_cli.errors import InputError
    from rlphf_cli.jobs import sample_count
    from rlphf_cli.recipe import load_recipe

    sampled, greedy = load_recipe(), load_recipe(None, ["generate.temperature=0"])
    assert sample_count(sampled) == (1, None) and sample_count(sampled, rollouts=True) == (2, None)
    assert sample_count(sampled, 4) == (4, None)
    assert sample_count(greedy, rollouts=True)[0] == 1 and "greedy" in sample_count(greedy)[1]
    assert sample_count(load_recipe(None, ["generate.num_samples=3"]), rollouts=True) == (3, None)
    # `rlphf run` asks for annotate.num_samples rollouts: a greedy recipe cannot make pairs.
    with pytest.raises(InputError, match=r"annotate.num_samples \(.*tiny.yaml\) 2 with --set generate.temperature 0"):
        sample_count(greedy, greedy.annotate.num_samples,
                     requested_by=f"annotate.num_samples ({greedy.origin('annotate.num_samples')})")
