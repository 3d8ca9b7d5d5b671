"""Issue 14: real faults in subprocesses (SIGKILL mid-work, a file size limit, an endpoint that
fails), each checked for what must hold afterwards: nothing lost, nothing half-written, nothing
done twice, no secret written down."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer
from helpers import without_recipe_line
from test_generation import make_adapter, write_prompts
from test_training import base_args, setup, trained_rm, with_rm  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.runs import read_jsonl

pytestmark = pytest.mark.slow  # child processes: ~45 s for the file
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-fault-suite-0123456789"

# Runs `rlphf ARGS` with every merged tensor written slowly, and a flag file touched after the
# first: the test kills the process in the middle of writing a soup (the library is unchanged).
SLOW_SOUP_WRITES = """
import pathlib, sys, time
from rlphf_cli.merging import io
original, flag = io.SafetensorsWriter.write, pathlib.Path(sys.argv[1])
def slow(self, key, tensor):
    original(self, key, tensor)
    flag.touch()
    time.sleep(0.25)
io.SafetensorsWriter.write = slow
from rlphf_cli.cli.main import main
sys.argv = ["rlphf", *sys.argv[2:]]
main()
"""


def start(args: list[str], *, hook_flag: Path | None = None, file_limit: int | None = None, **kwargs):
    """`rlphf ARGS` in a child process (with the slow-soup hook when `hook_flag` is given)."""
    command = [sys.executable, "-c", SLOW_SOUP_WRITES, str(hook_flag)] if hook_flag else [sys.executable, "-m",
                                                                                         "rlphf_cli"]

    def limits():
        if file_limit is not None:  # a real EFBIG on the first write past it
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.Popen([*command, *args], env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limits, **kwargs)


def kill_when(child, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert child.poll() is None, child.communicate()
        assert time.time() < deadline, "the child never got there"
        time.sleep(0.01)
    child.kill()
    child.wait()


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def test_sigkill_during_generate_then_resume_has_every_record_once(tiny_random_model, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Tell me about thing {i}."}
                                                   for i in range(10)])
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_random_model), "--prompts", str(prompts), "--num-samples", "2",
            "--max-new-tokens", "16", "--min-new-tokens", "16", "--batch-size", "2", "--out", str(out),
            "--run-dir", str(tmp_path / "run")]
    child = start(args)
    kill_when(child, lambda: out.exists() and len(out.read_text().splitlines()) >= 2)
    killed = [r["id"] for r in read_jsonl(out)]
    assert 2 <= len(killed) < 10
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == [f"q{i}" for i in range(10)]  # none missing, none twice, in prompt order
    assert len(out.read_text().splitlines()) == 10 and not leftovers(tmp_path)


def test_sigkill_during_train_policy_then_resume_continues_the_steps(with_rm, tiny_random_model):  # noqa: F811
    run = with_rm["run"]
    args = ["train-policy", "--pref", "P2A", *base_args(with_rm, tiny_random_model),
            "--set", "train_policy.rloo.max_steps=5", "--set", "train_policy.save_steps=1"]
    checkpoints = run / "policy" / ".P2A.checkpoints"
    child = start(args)
    kill_when(child, lambda: (checkpoints / "checkpoint-2" / "trainer_state.json").exists())
    assert not (run / "policy" / "P2A").exists()
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "policy" / "P2A" / "training.json").read_text())
    assert summary["steps"] == 5 and summary["resumed_from"] >= 2
    steps = [json.loads(line)["step"] for line in (run / "policy" / "P2A" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # continued, no step logged twice
    assert not checkpoints.exists()


def test_sigkill_during_annotate_against_a_failing_endpoint_asks_nothing_twice(tmp_path, monkeypatch):
    rollouts = write_prompts(tmp_path / "rollouts.jsonl", [
        {"id": f"q{i}", "instruction": f"Tell me about topic [q{i}].",
         "responses": ["Short.", f"A much longer answer about topic {i}, with detail."]} for i in range(10)])
    run = tmp_path / "run"
    monkeypatch.setenv("RLPHF_FAULT_KEY", KEY)
    faults = {"[q1]": [("429", 0.1)], "[q2]": ["500", "500"], "[q3]": ["garbage"],
              "[q4]": ["garbage"] * 50}  # q4: never readable -> explicitly invalid (whatever the kill left asked)
    with FakeOpenAIServer(latency=0.05, faults=faults) as server:
        endpoint = ["--judge", "openai", "--run-dir", str(run), "--set", f"judge.openai.base_url={server.base_url}",
                    "--set", "judge.openai.api_key_env=RLPHF_FAULT_KEY", "--set", "judge.openai.concurrency=2"]
        args = ["annotate", "--rollouts", str(rollouts), "--prefs", "P2A,P3A", *endpoint]
        cache = run / "annotations" / "judge_cache.jsonl"
        child = start(args)
        kill_when(child, lambda: cache.exists() and len(cache.read_text().splitlines()) >= 5)
        stdout, stderr = child.communicate()
        assert not (run / "annotations" / "P2A.jsonl").exists()  # killed before the end
        time.sleep(0.3)  # requests in flight when the process died are answered into the void
        saved = sum("answer" in r for r in read_jsonl(cache))
        lost = len(server.answered_messages) - saved  # answered, never received
        assert 0 <= lost <= 2  # at most the requests in flight (concurrency 2)
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        # The judge's cache and records too: the key must not reach them either.
        judged = runner.invoke(app, ["judge", "--a", str(rollouts), "--b", str(rollouts), "--criteria", "P2A",
                                     "--out", str(run / "judgments" / "same.json"), *endpoint])
        assert judged.exit_code == 0, judged.output
    answered = server.answered_messages
    assert len(answered) - len(set(answered)) <= lost  # no answer that was saved was asked for again
    for pref in ("P2A", "P3A"):
        summary = json.loads((run / "annotations" / f"{pref}.summary.json").read_text())
        assert summary["failed"] == 0
        assert summary["written"] + summary["ties_dropped"] + summary["invalid"] == summary["pairs"] == 10
        assert summary["invalid"] >= 1  # q4
    # The key is in no file, no log, no cache.
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert KEY not in file.read_text(errors="ignore"), file
    assert KEY not in stdout + stderr + result.output + judged.output


@pytest.mark.parametrize("where", ["merge", "run"])
def test_sigkill_while_a_soup_is_written_leaves_no_partial_soup(tiny_random_model, tmp_path, where):
    flag = tmp_path / "writing"
    run = tmp_path / "run"
    if where == "merge":
        for pref, seed in (("P2A", 1), ("P3A", 2)):
            make_adapter(tiny_random_model, run / "policy" / pref, seed=seed)
        args = ["merge", "--prefs", "concise,friendly", "--run-dir", str(run)]
        soup = run / "soups" / "P2A+P3A"
    else:
        train = write_prompts(tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": f"Tell me about {w}."}
                                                         for i, w in enumerate("sun rain snow wind tide".split())])
        recipe = {"name": "faults", "run_dir": str(run), "model": {"name": str(tiny_random_model)},
                  "preferences": {"use": ["P2A"]},
                  "data": {"train_prompts": str(train), "eval_prompts": str(train), "max_eval_prompts": 2},
                  "generate": {"max_new_tokens": 6},
                  "train_rm": {"trl": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 32}},
                  "train_policy": {"rloo": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2,
                                            "max_completion_length": 6}},
                  "judge": {"bootstrap_samples": 10}, "evaluation": {"baselines": ["base"], "sweep": None}}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        args = ["run", str(tmp_path / "recipe.yaml")]
        soup = run / "soups" / "P2A"
    child = start(args, hook_flag=flag)
    kill_when(child, flag.exists)
    assert not soup.exists() and leftovers(soup.parent)  # the half-written soup is a hidden temporary folder
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "events" not in p.name}

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (soup / "adapter_model.safetensors").is_file() and json.loads((soup / "soup.json").read_text())
    assert not leftovers(run)  # the killed process's temporary folder is gone too
    if where == "run":  # finished units were not redone
        assert "rollouts: up to date" in result.output and "train-policy: up to date" in result.output
        assert all(p.stat().st_mtime_ns == t for p, t in before.items()
                   if p.relative_to(run).parts[0] in ("rollouts.jsonl", "annotations", "rm", "policy"))


def test_a_file_size_limit_is_one_line_and_the_previous_soup_stays(tiny_random_model, tmp_path):
    run = tmp_path / "run"
    for pref, seed in (("P2A", 1), ("P3A", 2)):
        make_adapter(tiny_random_model, run / "policy" / pref, seed=seed)
    args = ["merge", "--prefs", "concise,friendly", "--run-dir", str(run)]
    assert runner.invoke(app, args).exit_code == 0
    soup = run / "soups" / "P2A+P3A"
    before = tree_hash(soup)
    size = (soup / "adapter_model.safetensors").stat().st_size
    child = start([*args, "--force", "--method", "exact"], file_limit=size // 2)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 2, stdout + stderr
    assert without_recipe_line(stderr).strip() == f"error: {soup}: file too large (a file size limit, e.g. `ulimit -f`, or the file " \
                             "system's)", stderr
    assert "Traceback" not in stdout + stderr
    assert tree_hash(soup) == before and not leftovers(run)


def test_a_file_size_limit_in_a_rust_writer_is_named_too(tmp_path):
    """safetensors (Rust) reports EFBIG as its own exception; the trainer saves models through it."""
    code = ("import resource, sys, torch\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from safetensors.torch import save_file\n"
            "from rlphf_cli.runs import fs_errors\n"
            "with fs_errors(sys.argv[1]):\n"
            "    save_file({'a': torch.zeros(10000)}, sys.argv[1] + '/model.safetensors')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert done.stderr.strip().endswith(f"rlphf_cli.errors.FileSystemError: {tmp_path}: file too large (a file size "
                                        "limit, e.g. `ulimit -f`, or the file system's)"), done.stderr
