"""Multi-process training on CPU: `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m rlphf_cli ...`.

`accelerate launch --cpu --num_processes 2` starts one process (accelerate spawns CPU ranks through
mpirun only); torchrun starts two gloo ranks, which is what `accelerate launch` does on GPUs. Each
job runs with tests/launch_hooks/sitecustomize.py, which logs every file each rank writes under the
run directory: the run's artifacts must be written once, by rank 0. A rank that fails must end the
job with its error line, not leave the other rank waiting in a collective.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_training import RECIPE as TRAINING_RECIPE
from test_training import write_pairs

import rlphf_cli

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "launch_hooks"
SOURCE_ROOT = Path(rlphf_cli.__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240  # a job that hangs fails here instead of stalling the suite

# test_training's small settings, over one dimension's two preferences (P-MORL needs two).
RECIPE = {**TRAINING_RECIPE, "preferences": {"use": ["P2A", "P2B"]}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_random_model):
    """A recipe, prompts, P2A/P2B annotations and one single-process reward model per preference."""
    from rlphf_cli.jobs import reward_model_jobs
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training.reward import train_reward_model

    root = tmp_path_factory.mktemp("distributed")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Explain topic {i}"}) + "\n" for i in range(8)))
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({**RECIPE, "model": {"name": str(tiny_random_model)},
                                           "data": {"train_prompts": str(prompts)}}))
    annotations = root / "annotations"
    for seed, pref in enumerate(("P2A", "P2B")):
        write_pairs(annotations / f"{pref}.jsonl", pref, n=32, seed=seed)
    recipe = load_recipe(recipe_path, [f"run_dir={root / 'scratch'}"])
    for pref in ("P2A", "P2B"):
        train_reward_model(reward_model_jobs(recipe, pref, data=annotations / f"{pref}.jsonl", out=root / "rm" / pref)[0])
    return {"root": root, "recipe": recipe_path}


def new_run(prepared, tmp_path: Path, with_reward_models: bool) -> Path:
    run = tmp_path / "run"
    shutil.copytree(prepared["root"] / "annotations", run / "annotations")
    if with_reward_models:
        shutil.copytree(prepared["root"] / "rm", run / "rm")
    return run


def torchrun(args: list[str], run: Path, trace: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --standalone --nproc_per_node 2 -m rlphf_cli ARGS` (a free port: other jobs may hold 29500)."""
    environment = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HOOKS), str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]),
        "RLPHF_TRACE_WRITES": f"{run}:{trace}",
        "COLUMNS": "200",
        **env,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlphf_cli", *args]
    start = time.monotonic()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    return result, time.monotonic() - start


def writes(trace: Path, rank: int) -> list[tuple[str, Path]]:
    log = Path(f"{trace}.{rank}")
    if not log.exists():
        return []
    return [(event, Path(path)) for event, path in (line.split("\t") for line in log.read_text().splitlines())]


def outside_checkpoints(events: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Trainer checkpoints hold one RNG state file per rank by design; nothing else may come from rank 1."""
    return [(event, path) for event, path in events if not any(part.endswith(".checkpoints") for part in path.parts)]


def assert_published_once_by_rank_zero(out_dir: Path, trace: Path) -> None:
    """Every file of `out_dir` was written once, by rank 0, into the folder that was renamed to `out_dir`."""
    assert out_dir.is_dir()
    assert outside_checkpoints(writes(trace, 1)) == []
    staged = f".{out_dir.name}.tmp-"
    rank0 = [path for event, path in writes(trace, 0) if event == "open"]
    for file in out_dir.iterdir():
        if file.name == "adapter_model.safetensors":
            continue  # written by safetensors' native code into the staging folder, copied by Python below
        copies = [p for p in rank0 if p.parent.name.startswith(staged) and p.parent.parent == out_dir.parent
                  and (p.name == file.name or p.name.startswith(f".{file.name}.tmp-"))]
        assert len(copies) == 1, (file.name, copies)
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


def step_lines(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_train_rm_on_two_ranks(prepared, tmp_path):
    run = new_run(prepared, tmp_path, with_reward_models=False)
    trace = tmp_path / "trace"
    result, wall = torchrun(["train-rm", "--prefs", "concise", "--recipe", str(prepared["recipe"]), "--run-dir", str(run)],
                            run, trace)
    assert result.returncode == 0, result.stdout + result.stderr
    rm = run / "rm" / "P2A"
    assert_published_once_by_rank_zero(rm, trace)
    metrics = json.loads((rm / "metrics.json").read_text())
    # Each rank takes half the pairs (the sampler pads to an even split): half the single-process steps.
    per_rank = -(-metrics["pairs_train"] // 2)
    assert metrics["steps"] == -(-per_rank // TRAINING_RECIPE["train_rm"]["trl"]["per_device_train_batch_size"])
    assert step_lines(rm / "metrics.jsonl") == list(range(1, metrics["steps"] + 1))
    assert result.stdout.count("reward models") == 1  # one results table, from rank 0
    print(f"train-rm on 2 ranks: {metrics['steps']} steps, {metrics['s_per_step']} s/step, "
          f"accuracy {metrics['accuracy']:.0%}, job {wall:.1f} s")


# One row per training mode; the job trains `policy/<name>` and checks its artifacts. Add a mode here
# (e.g. multitask) to run it on two ranks as well.
POLICY_JOBS = [
    pytest.param("P2A", ["--prefs", "P2A", "--algo", "rloo"], id="rloo"),
    pytest.param("P2A", ["--prefs", "P2A", "--algo", "dpo"], id="dpo"),
    pytest.param("morl", ["--mode", "morl"], id="morl"),
    pytest.param("multitask", ["--mode", "multitask"], id="multitask"),
]


@pytest.mark.parametrize(("name", "options"), POLICY_JOBS)
def test_train_policy_on_two_ranks(prepared, tmp_path, name, options):
    run = new_run(prepared, tmp_path, with_reward_models=True)
    trace = tmp_path / "trace"
    result, wall = torchrun(["train-policy", *options, "--recipe", str(prepared["recipe"]), "--run-dir", str(run)],
                            run, trace)
    assert result.returncode == 0, result.stdout + result.stderr
    policy = run / "policy" / name
    assert_published_once_by_rank_zero(policy, trace)
    summary = json.loads((policy / "training.json").read_text())
    assert summary["steps"] == 2
    assert step_lines(policy / "metrics.jsonl") == [1, 2]
    assert result.stdout.count("policies") == 1
    print(f"train-policy {' '.join(options)} on 2 ranks: {summary['s_per_step']} s/step, job {wall:.1f} s")


def test_pipeline_stage_on_two_ranks_writes_markers_and_events_once(prepared, tmp_path):
    """One job-array task: `rlphf run RECIPE --only train-rm --pref P2B` under torchrun."""
    run = new_run(prepared, tmp_path, with_reward_models=False)
    trace = tmp_path / "trace"
    result, _ = torchrun(["run", str(prepared["recipe"]), "--run-dir", str(run), "--only", "train-rm", "--prefs", "P2B"],
                         run, trace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_published_once_by_rank_zero(run / "rm" / "P2B", trace)
    assert not (run / "rm" / "P2A").exists()  # --pref picked one unit
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["event"]) for e in events] == [("command", "command"), ("train-rm", "start"),
                                                          ("train-rm/P2B", "done"), ("train-rm", "end")]
    assert events[-1]["outcome"] == "ok"
    assert json.loads((run / ".markers" / "train-rm__P2B.json").read_text())["stage"] == "train-rm/P2B"
    assert sorted(p.name for p in (run / ".markers").iterdir()) == ["train-rm__P2B.json"]
    rank0 = [path.name for event, path in writes(trace, 0) if event == "open"]
    for record in ("recipe.yaml", "env.json", "train-rm__P2B.json"):
        assert sum(name.startswith(f".{record}.tmp-") for name in rank0) == 1, record
    assert sum(name == "events.jsonl" for name in rank0) == 4  # one append per line


def test_a_failing_rank_ends_the_job_with_its_error(prepared, tmp_path):
    """Rank 1's reward model fails at the first step while rank 0 waits for it in a collective."""
    run = new_run(prepared, tmp_path, with_reward_models=True)
    trace = tmp_path / "trace"
    result, wall = torchrun(["train-policy", "--prefs", "P2A", "--recipe", str(prepared["recipe"]), "--run-dir", str(run)],
                            run, trace, RLPHF_FAIL_ON_RANK="1")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "error: " in output and "injected failure on rank 1" in output
    # The launcher's closing summary names the root cause with that line (it reads the rank's error file).
    summary = output[output.rindex("Root Cause"):]
    assert "rank      : 1" in summary and "injected failure on rank 1" in summary, summary
    assert not (run / "policy" / "P2A").exists()  # nothing published
    print(f"failing rank: job ended in {wall:.1f} s with exit code {result.returncode}")
