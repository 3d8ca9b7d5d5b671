"""Issue 17: the run directory is a faithful record. A reusable recipe.yaml, each command's settings
in its own output's record and in events.jsonl, no silent overwrite, fingerprints over what is on
disk, a resume that reproduces, file-system failures as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_generate import PROMPTS, make_adapter, other_base, recipe_for, write_prompts  # noqa: F401 (fixture)
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.jobs import run_record
from rlphf_cli.recipe import load_recipe
from rlphf_cli.runs import RunDir, read_jsonl

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def one_line(result, *fragments: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output.strip()


def mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


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
    (run / "judgments" / "prompted_vs_prompted").mkdir(parents=True)
    (run / "judgments" / "prompted_vs_prompted" / "P2A.json").write_text("{}")
    return run, ["--run-dir", str(run), "--model", str(tiny_random_model)]


@pytest.mark.parametrize(("args", "replaced", "what"), [
    (["generate", "--limit", "2"], "rollouts.jsonl", "3 records"),
    (["annotate", "--prefs", "P2A"], "annotations/P2A.jsonl", "4 records"),
    (["train-rm", "--pref", "P2A"], "rm/P2A", "written"),
    (["train-policy", "--pref", "P2A"], "policy/P2A", "written"),
    (["merge", "--prefs", "concise,friendly"], "soups/P2A+P3A", "a soup made with 'average', weights 0.5, 0.5"),
    (["judge", "--a", "GEN", "--b", "GEN"], "judgments/prompted_vs_prompted/P2A.json", "written"),
])
def test_a_stage_command_never_replaces_a_finished_output_silently(finished, args, replaced, what):
    run, common = finished
    args = [str(run / "generations/prompted/P2A.jsonl") if a == "GEN" else a for a in args]
    if args[0] in ("annotate", "judge", "merge"):
        common = common[:2]
    before = mtimes(run)
    line = one_line(runner.invoke(app, [*args, *common]), f"{run / replaced}: exists ({what}", "--force")
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
# 3. Resume reproduces


def test_sampling_is_seeded_per_prompt_not_per_batch(tiny_random_model, tmp_path):
    from helpers import generator_for

    gen = generator_for(recipe_for(tiny_random_model, tmp_path, **{"generate.max_new_tokens": 12}))
    texts = [gen.prompt_text(p["instruction"]) for p in PROMPTS]
    together = gen.generate(texts, num_samples=2)[0]
    gen.batch_size = 2  # one prompt (two samples) per batch
    alone = gen.generate(texts, num_samples=2)[0]
    subset = gen.generate(texts[2:], num_samples=2)[0]
    assert together == alone and subset == together[2:]
    assert len({s for r in together for s, _ in r}) > 5  # and they are samples, not one answer


def test_resume_refuses_other_settings_naming_the_difference(tiny_random_model, other_base, tmp_path):  # noqa: F811
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "o.jsonl"
    base = ["generate", "--model", str(tiny_random_model), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "4", "--run-dir", str(tmp_path / "run")]
    assert runner.invoke(app, [*base, "--limit", "3"]).exit_code == 0
    before = out.read_text()
    adapter = make_adapter(tiny_random_model, tmp_path / "lora", seed=3)
    for extra, difference in [
        (["--temperature", "0.5"], "sampling.temperature 1.0, not 0.5"),
        (["--prefs", "P2A"], "system 'base', not 'prompted'"),
        (["--prefs", "P2A", "--system", "base"], "combination '', not 'P2A'"),
        (["--adapter", str(adapter), "--system", "base"], "adapters 'none', not '"),
        (["--seed", "4"], "sampling.seed 0, not 4"),
        (["--model", str(other_base)], f"model '{tiny_random_model}', not '{other_base}'"),
        (["--num-samples", "3"], "samples per prompt 2, not 3"),  # rollouts: annotate.num_samples
    ]:
        one_line(runner.invoke(app, [*base, "--resume", *extra]), f"{out}: id 'p0' was written with {difference}")
    assert out.read_text() == before

    # A resume with fewer prompts keeps the records it does not regenerate.
    result = runner.invoke(app, [*base, "--resume", "--limit", "2"])
    assert result.exit_code == 0 and "kept 1 records" in result.output, result.output
    assert out.read_text() == before


def test_sigint_during_the_last_batch_is_an_interruption_not_a_success(tiny_random_model, tmp_path, monkeypatch):
    from rlphf_cli.generation import Generator

    original = Generator.generate

    def interrupted_after_the_last_batch(self, texts, num_samples=1, on_batch=None):
        original(self, texts, num_samples, on_batch)
        raise KeyboardInterrupt  # Ctrl-C while the last batch was being written

    monkeypatch.setattr(Generator, "generate", interrupted_after_the_last_batch)
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--prompts",
                                 str(write_prompts(tmp_path / "p.jsonl", PROMPTS)), "--out", str(out),
                                 "--max-new-tokens", "3", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 130 and "wrote" not in result.output, result.output
    assert "5 records kept, 5 of the 5 prompts asked for; all written, nothing to resume" in result.output
    assert len(read_jsonl(out)) == 5


@pytest.mark.slow
def test_a_real_sigint_then_the_printed_resume_command_equals_an_uninterrupted_run(tiny_random_model, tmp_path):
    import shlex

    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Tell me about thing {i}."}
                                                   for i in range(10)])
    args = ["generate", "--model", str(tiny_random_model), "--prompts", str(prompts), "--num-samples", "2",
            "--max-new-tokens", "16", "--min-new-tokens", "16", "--batch-size", "2", "--run-dir", str(tmp_path / "run")]
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "--out", str(whole)]).exit_code == 0

    cut = tmp_path / "cut.jsonl"
    # Background jobs of a non-interactive shell ignore SIGINT; the child must not inherit that.
    child = subprocess.Popen([sys.executable, "-m", "rlphf_cli", *args, "--out", str(cut)],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and (not cut.exists() or len(cut.read_text().splitlines()) < 3):
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stdout + stderr
    kept = len(read_jsonl(cut))
    assert 3 <= kept < 10, stderr
    assert f"{cut}: {kept} records kept, {kept} of the 10 prompts asked for" in stderr, stderr
    assert "wrote" not in stdout
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: rlphf "))
    resumed = runner.invoke(app, shlex.split(command.removeprefix("resume with: rlphf ")))
    assert resumed.exit_code == 0, resumed.output
    assert read_jsonl(cut) == read_jsonl(whole)  # record for record


# --------------------------------------------------------------------------------------------
# 4. File-system failures: one line naming the path, before the work


@pytest.mark.parametrize("args", [
    ["generate", "--limit", "1"], ["annotate"], ["train-rm", "--pref", "P2A"], ["merge", "--prefs", "P2A,P3A"],
    ["judge", "--a", "x.jsonl", "--b", "y.jsonl"], ["run", "--only", "report"],
])
def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    Path("taken").write_text("a file")
    one_line(runner.invoke(app, [*args, "--run-dir", "taken"]), "--run-dir: run_dir: taken: taken is a file, not a folder")


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
        one_line(runner.invoke(app, [*judge, "--out", str(tmp_path / "blocker" / "j.json")]),
                 f"{tmp_path / 'blocker' / 'j.json'}: {tmp_path / 'blocker'} is a file, not a folder")
        locked = tmp_path / "locked"
        locked.mkdir()
        with unwritable(locked):
            line = one_line(runner.invoke(app, [*judge, "--out", str(locked / "j.json")]), f"{locked / 'j.json'}: ")
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
        line = one_line(runner.invoke(app, args), f"{locked}/")
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


@pytest.mark.slow
def test_a_finished_run_reruns_from_its_recipe_and_notices_a_replaced_output(tmp_path, tiny_random_model):
    train = write_prompts(tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": f"Tell me about {w}."}
                                                     for i, w in enumerate("sun rain snow wind tide rock".split())])
    recipe = {"name": "record", "run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_random_model)},
              "preferences": {"use": ["P1A", "P2A"]},
              "data": {"train_prompts": str(train), "eval_prompts": str(train), "max_eval_prompts": 3},
              "generate": {"max_new_tokens": 8, "batch_size": 16},
              "train_rm": {"trl": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 48}},
              "train_policy": {"rloo": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2,
                                        "max_completion_length": 8}},
              "judge": {"bootstrap_samples": 20}, "evaluation": {"baselines": ["base"], "sweep": None}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0
    assert json.loads((run / "policy" / "P2A" / "training.json").read_text())["settings"]["trainer"]["fields"][
        "max_steps"] == 1
    before = mtimes(run)
    again = runner.invoke(app, ["run", str(run / "recipe.yaml")])  # the record runs as is
    assert again.exit_code == 0, again.output
    assert {p: t for p, t in mtimes(run).items() if p.name != "events.jsonl"} == {
        p: t for p, t in before.items() if p.name != "events.jsonl"}

    # A stage command replaces a policy (with --force and its own settings): the run's recipe stays,
    # and the next `rlphf run` keeps that policy and recomputes what depends on it, saying so.
    recipe_text = (run / "recipe.yaml").read_text()
    forced = runner.invoke(app, ["train-policy", "--pref", "P2A", "--run-dir", str(run), "--recipe", str(path),
                                 "--set", "train_policy.rloo.max_steps=2", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (run / "recipe.yaml").read_text() == recipe_text
    assert json.loads((run / "policy" / "P2A" / "training.json").read_text())["steps"] == 2
    policy = mtimes(run / "policy")
    rerun = runner.invoke(app, ["run", str(path)])
    assert rerun.exit_code == 0, rerun.output
    assert "policy/P2A changed since `rlphf run` made it" in rerun.output.replace("\n", " ")
    assert mtimes(run / "policy") == policy  # kept, not retrained
    after = mtimes(run)
    assert after[run / "soups" / "P1A+P2A" / "soup.json"] != before[run / "soups" / "P1A+P2A" / "soup.json"]
    assert after[run / "judgments" / "psoups_vs_base.json"] != before[run / "judgments" / "psoups_vs_base.json"]
    assert after[run / "rm" / "P2A" / "adapter_model.safetensors"] == before[run / "rm" / "P2A" / "adapter_model.safetensors"]
    assert [e["stage"] for e in RunDir(run).events() if e["event"] == "changed"] == ["train-policy/P2A"]
