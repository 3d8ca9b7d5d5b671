"""The run directory (rlphf_cli.runs) as a faithful record: a reusable recipe.yaml, each command's
settings in its own output's record and in events.jsonl, no silent overwrite, file-system failures as
one line before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mtimes, one_error_line
from test_generation import PROMPTS, make_adapter, other_base, recipe_for, write_prompts  # noqa: F401 (fixture)
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.jobs import run_record
from rlphf_cli.recipe import load_recipe
from rlphf_cli.runs import RunDir, read_jsonl

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# 1. recipe.yaml is the exact resolved recipe; a command's own settings go elsewhere


def test_recipe_yaml_is_the_exact_resolved_recipe_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-a-secret-value")
    recipe = load_recipe("tiny", [f"run_dir={tmp_path / 'run'}", "generate.max_new_tokens=77",
                                  "judge.openai.max_tokens=9", "train_policy.rloo.max_completion_length=77"])
    run = RunDir.open(recipe.resolved_run_dir(), run_record(recipe))
    text = (run.root / "recipe.yaml").read_text()
    assert "<redacted>" not in text and "max_new_tokens: 77" in text and "max_tokens: 9" in text
    again = load_recipe(str(run.root / "recipe.yaml"))
    assert again.model_dump() == recipe.model_dump()
    # A secret is known by what it is: the value of a variable a `*_env` key names.
    with run.stage("annotate") as info:
        info["note"] = "the endpoint said: bad key sk-test-a-secret-value"
    assert "sk-test-a-secret-value" not in (run.root / "events.jsonl").read_text()
    assert "<secret>" in (run.root / "events.jsonl").read_text()


def test_a_stage_command_records_its_settings_in_its_output_and_events_not_in_the_recipe(tiny_random_model, tmp_path):
    run = tmp_path / "run"
    base = ["--model", str(tiny_random_model), "--run-dir", str(run), "--limit", "2", "--max-new-tokens", "4"]
    assert runner.invoke(app, ["generate", *base]).exit_code == 0
    recipe_before = (run / "recipe.yaml").read_text()
    result = runner.invoke(app, ["generate", *base, "--prefs", "P2A", "--set", "generate.top_k=5",
                                 "--temperature", "0.7"])
    assert result.exit_code == 0, result.output
    assert (run / "recipe.yaml").read_text() == recipe_before  # the run's recipe is not rewritten
    records = read_jsonl(run / "generations" / "prompted" / "P2A.jsonl")
    assert records[0]["sampling"]["top_k"] == 5 and records[0]["sampling"]["temperature"] == 0.7
    assert records[0]["weights"]["model"] == str(tiny_random_model)
    commands = [e for e in RunDir(run).events() if e["event"] == "command"]
    assert [c["command"] for c in commands] == ["rlphf generate", "rlphf generate"]
    assert commands[1]["overrides"] == {"generate.top_k": 5, "generate.temperature": 0.7,
                                        "model.name": str(tiny_random_model), "generate.max_new_tokens": 4,
                                        "run_dir": str(run)}
    assert commands[1]["options"]["prefs"] == "P2A"

    # A judgment records the judge settings it was made with.
    out = run / "judgments" / "x.json"
    assert runner.invoke(app, ["judge", "--a", str(run / "generations/prompted/P2A.jsonl"), "--b",
                               str(run / "generations/prompted/P2A.jsonl"), "--out", str(out), "--run-dir", str(run),
                               "--bootstrap-samples", "7"]).exit_code == 0
    assert json.loads(out.read_text())["settings"]["bootstrap_samples"] == 7
    assert (run / "recipe.yaml").read_text() == recipe_before


# --------------------------------------------------------------------------------------------
# 2. No silent overwrite


@pytest.fixture
def finished(tiny_random_model, tmp_path):
    """A run directory holding one finished output of every stage command (made cheaply)."""
    run = tmp_path / "run"
    run.mkdir()
    write_prompts(run / "rollouts.jsonl", [{"id": f"p{i}", "instruction": f"Tell me about {w}.",
                                            "responses": [f"{w} is nice.", f"{w} is a very long topic indeed."]}
                                           for i, w in enumerate(["sun", "rain", "snow"])])
    (run / "annotations").mkdir()
    pair = {"prompt": "Tell me about sun.", "chosen": "Short.", "rejected": "A long answer here."}
    write_prompts(run / "annotations" / "P2A.jsonl", [pair] * 4)
    for pref in ("P2A", "P3A"):
        make_adapter(tiny_random_model, run / "policy" / pref, seed=len(pref) + ord(pref[1]))
    (run / "rm" / "P2A").mkdir(parents=True)
    (run / "rm" / "P2A" / "adapter_config.json").write_text("{}")
    (run / "soups" / "P2A+P3A").mkdir(parents=True)
    (run / "soups" / "P2A+P3A" / "soup.json").write_text('{"method": "average", "weights": [0.5, 0.5]}')
    gen = run / "generations" / "prompted" / "P2A.jsonl"
    gen.parent.mkdir(parents=True)
    gen.write_text('{"id": "p0", "instruction": "x", "preferences": ["P2A"], "combo": "P2A", "response": "a"}\n')
    (run / "judgments").mkdir(parents=True)
    (run / "judgments" / "prompted-P2A_vs_prompted-P2A.json").write_text("{}")
    return run, ["--run-dir", str(run), "--model", str(tiny_random_model)]


@pytest.mark.parametrize(("args", "replaced", "what"), [
    (["generate", "--limit", "2"], "rollouts.jsonl", "3 records"),
    (["annotate", "--prefs", "P2A"], "annotations/P2A.jsonl", "4 records"),
    (["train-rm", "--pref", "P2A"], "rm/P2A", "written"),
    (["train-policy", "--pref", "P2A"], "policy/P2A", "written"),
    (["merge", "--prefs", "concise,friendly"], "soups/P2A+P3A", "a soup made with 'average', weights 0.5, 0.5"),
    (["judge", "--a", "GEN", "--b", "GEN"], "judgments/prompted-P2A_vs_prompted-P2A.json", "written"),
])
def test_a_stage_command_never_replaces_a_finished_output_silently(finished, args, replaced, what):
    run, common = finished
    args = [str(run / "generations/prompted/P2A.jsonl") if a == "GEN" else a for a in args]
    if args[0] in ("annotate", "judge", "merge"):
        common = common[:2]
    before = mtimes(run)
    line = one_error_line(runner.invoke(app, [*args, *common]), f"{run / replaced}: exists ({what}", "--force")
    assert "--force" in line
    assert mtimes(run) == before and not (run / "recipe.yaml").exists()


def test_force_replaces_and_a_weighted_soup_gets_its_own_folder(finished):
    run, common = finished
    result = runner.invoke(app, ["merge", "--prefs", "concise,friendly", "--weights", "0.7,0.3", *common[:2]])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "soups" / "P2A=0.7+P3A=0.3" / "soup.json").read_text())["weights"] == [0.7, 0.3]
    result = runner.invoke(app, ["merge", "--prefs", "concise,friendly", "--force", *common[:2]])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "soups" / "P2A+P3A" / "soup.json").read_text())["preferences"] == ["P2A", "P3A"]


# --------------------------------------------------------------------------------------------
# 3. File-system failures: one line naming the path, before the work


@pytest.mark.parametrize("args", [
    ["generate", "--limit", "1"], ["annotate"], ["train-rm", "--pref", "P2A"], ["merge", "--prefs", "P2A,P3A"],
    ["judge", "--a", "x.jsonl", "--b", "y.jsonl"], ["run", "--only", "report"],
])
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    Path("taken").write_text("a file")
    one_error_line(runner.invoke(app, [*args, "--run-dir", "taken"]), "--run-dir: run_dir: taken: taken is a file, not a folder")


def test_an_output_that_cannot_be_written_fails_before_the_work(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai_server import FakeOpenAIServer

    gen = tmp_path / "g.jsonl"
    gen.write_text('{"id": "p0", "instruction": "x", "preferences": ["P2A"], "combo": "P2A", "response": "a"}\n')
    (tmp_path / "blocker").write_text("a file where a folder should be")
    monkeypatch.setenv("RLPHF_TEST_KEY", "sk-test-unused")
    with FakeOpenAIServer() as server:
        judge = ["judge", "--a", str(gen), "--b", str(gen), "--judge", "openai", "--set",
                 f"judge.openai.base_url={server.base_url}", "--set", "judge.openai.api_key_env=RLPHF_TEST_KEY",
                 "--run-dir", str(tmp_path / "run")]
        one_error_line(runner.invoke(app, [*judge, "--out", str(tmp_path / "blocker" / "j.json")]),
                 f"{tmp_path / 'blocker' / 'j.json'}: {tmp_path / 'blocker'} is a file, not a folder")
        locked = tmp_path / "locked"
        locked.mkdir()
        with unwritable(locked):
            line = one_error_line(runner.invoke(app, [*judge, "--out", str(locked / "j.json")]), f"{locked / 'j.json'}: ")
        assert "permission denied" in line or "not permitted" in line
        assert server.requests == 0  # nothing judged before failing
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["generate", "annotate", "train-rm", "merge", "run --only report"])
def test_an_immutable_output_folder_is_one_line_for_every_command(finished, command):
    run, common = finished
    locked = run.parent / "locked"
    locked.mkdir()
    args = {
        "generate": ["generate", "--limit", "1", "--out", str(locked / "o.jsonl"), *common],
        "annotate": ["annotate", "--prefs", "P2A", "--out", str(locked / "ann"), *common[:2]],
        "train-rm": ["train-rm", "--pref", "P2A", "--out", str(locked / "rm"), *common],
        "merge": ["merge", "--prefs", "P2A,P3A", "--out", str(locked / "soup"), *common[:2]],
        "run --only report": ["run", "--only", "report", "--run-dir", str(locked / "run")],
    }[command]
    with unwritable(locked):
        line = one_error_line(runner.invoke(app, args), f"{locked}/")
    assert "permission denied" in line or "not permitted" in line
    assert list(locked.iterdir()) == []


class unwritable:
    """A folder nobody may write into: chmod for a user, the immutable attribute for root (who
    ignores permissions)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(self.path)], check=True)
        else:
            self.path.chmod(0o555)
        return self.path

    def __exit__(self, *exc):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        else:
            self.path.chmod(0o755)


# --------------------------------------------------------------------------------------------
# The whole record on a finished pipeline run


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
