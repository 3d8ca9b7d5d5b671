"""Input files (rlphf_cli.files): whatever is wrong with a file any command reads is one line naming the
file, with nothing before it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import one_error_line
from typer.testing import CliRunner

from rlphf_cli.cli.main import app

runner = CliRunner()


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
    line = one_error_line(_invoke_with_bad(kind, bad, tmp_path, tiny_random_model), expected, exact=True)
    assert line.startswith(f"error: {bad}: "), line
    assert not (tmp_path / "run").exists()  # nothing written for an input that does not read
