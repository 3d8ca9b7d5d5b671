"""The cluster files that ship with the recipes, checked without a cluster: accelerate configs through
accelerate's own loader, the SLURM script with `bash -n` and each `rlphf` command it runs with --dry-run;
and what `rlphf run` accepts under a distributed launch."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.recipe import builtin_recipes_dir

runner = CliRunner()
RECIPES = builtin_recipes_dir()
PROJECT = RECIPES.parent  # the sbatch script runs from where `recipes/...` resolves
SBATCH = RECIPES / "slurm" / "psoups.sbatch"


@pytest.mark.parametrize(("name", "kind", "zero_stage"), [("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2),
                                                          ("zero3", "DEEPSPEED", 3)])
def test_accelerate_configs_load_with_accelerate(name, kind, zero_stage):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml"))  # unknown top-level keys fail here
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    assert config.deepspeed_config.get("zero_stage") == zero_stage
    # accelerate launch turns each deepspeed_config key into its option of the same name: no stray keys.
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.deepspeed_config) <= options, set(config.deepspeed_config) - options


def sbatch_commands(tmp_path: Path, part: str, **env: str) -> list[list[str]]:
    """Run the script's `part` with `rlphf` and `accelerate` replaced by stubs that log their arguments."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / f"{part}-{env.get('SLURM_ARRAY_TASK_ID', '')}.log"
    for tool in ("rlphf", "accelerate"):
        stub = stubs / tool
        stub.write_text(f'#!/bin/bash\nprintf "%q " {tool} "$@" >> "{log}"\necho >> "{log}"\n')
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SBATCH), part], cwd=PROJECT, capture_output=True, text=True, timeout=60,
                            env={**clean, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", **env})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in log.read_text().splitlines()]


def as_rlphf(command: list[str]) -> tuple[list[str], int]:
    """(rlphf arguments, processes) of a logged `rlphf ...` or `accelerate launch ... -m rlphf_cli ...`."""
    if command[0] == "rlphf":
        return command[1:], 1
    from accelerate.commands.config.config_args import load_config_from_file

    assert command[:2] == ["accelerate", "launch"], command
    config = command[command.index("--config_file") + 1]
    load_config_from_file(str(PROJECT / config))
    module = command.index("-m")
    assert command[module + 1] == "rlphf_cli"
    return command[module + 2:], int(command[command.index("--num_processes") + 1])


def test_sbatch_script_parses_and_every_rlphf_line_dry_runs(tmp_path, monkeypatch):
    check = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "#SBATCH --array" not in SBATCH.read_text()  # the array is the train part's, given at submission

    commands = sbatch_commands(tmp_path, "prepare")
    for task in range(6):
        commands += sbatch_commands(tmp_path, "train", SLURM_ARRAY_TASK_ID=str(task), SLURM_GPUS_ON_NODE="4")
    commands += sbatch_commands(tmp_path, "finish")
    trained = set()
    for command in commands:
        args, processes = as_rlphf(command)
        # Each process of a launch sees WORLD_SIZE: rlphf run then accepts training stages only.
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        monkeypatch.setenv("RANK", "0")
        result = runner.invoke(app, [*args, "--dry-run"])
        assert result.exit_code == 0, (command, result.output)
        assert "estimated GPU-hours" in result.output
        if "--prefs" in args:
            trained.add((args[args.index("--only") + 1], args[args.index("--prefs") + 1]))
    assert trained == {(stage, p) for stage in ("train-rm", "train-policy")
                       for p in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")}

    bad = subprocess.run(["bash", str(SBATCH), "train"], cwd=PROJECT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert bad.returncode != 0 and "--array=0-5" in bad.stderr


def test_run_under_a_distributed_launch_trains_only(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["run", "psoups-paper", "--run-dir", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2
    assert "under a distributed launch (2 processes) rlphf run trains only: add --only train-rm" in result.output
    result = runner.invoke(app, ["run", "psoups-paper", "--run-dir", str(tmp_path), "--only", "merge", "--dry-run"])
    assert result.exit_code == 2
    monkeypatch.delenv("WORLD_SIZE")
    result = runner.invoke(app, ["run", "psoups-paper", "--run-dir", str(tmp_path), "--prefs", "P2A", "--dry-run"])
    assert result.exit_code == 2 and "--prefs picks units of one per-preference stage" in result.output
    result = runner.invoke(app, ["run", "psoups-paper", "--run-dir", str(tmp_path), "--only", "train-rm", "--prefs",
                                 "concize", "--dry-run"])
    assert result.exit_code == 2 and "unknown preference 'concize'" in result.output
    result = runner.invoke(app, ["run", "psoups-paper", "--run-dir", str(tmp_path), "--only", "train-rm", "--prefs",
                                 "concise", "--dry-run"])
    assert result.exit_code == 0 and "this command runs --only train-rm for P2A" in result.output
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
