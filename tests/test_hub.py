"""Hub names without a network: a model `org/tiny-chat` and a prompt set `owner/prompts` in a Hugging Face
cache laid out as `hf download` leaves it, read with HF_HUB_OFFLINE=1 through the code any hub name takes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import one_error_line
from test_training import RECIPE, write_pairs
from typer.testing import CliRunner

import rlphf_cli
from rlphf_cli.cli.main import app

runner = CliRunner()
SOURCE_ROOT = Path(rlphf_cli.__file__).resolve().parents[1]
MISSING_MODEL = "rlphf-tests/no-such-model"
MISSING_DATASET = "rlphf-tests/no-such-prompts"


def fill_hub_cache(hub: Path, repo_id: str, source: Path, repo_type: str = "model") -> Path:
    """<hub>/<models|datasets>--org--name/snapshots/<sha>/ holding `source`'s files, and refs/main -> <sha>."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(source, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_random_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    home = tmp_path_factory.mktemp("hf-home")
    fill_hub_cache(home / "hub", "org/tiny-chat", tiny_random_model)
    data = tmp_path_factory.mktemp("prompts-repo")
    (data / "data").mkdir()
    table = pa.table({"id": [f"h{i}" for i in range(5)], "prompt": [f"Explain hub topic {i}." for i in range(5)]})
    pq.write_table(table, data / "data" / "train-00000-of-00001.parquet")
    fill_hub_cache(home / "hub", "owner/prompts", data, repo_type="dataset")
    return home


def rlphf(args: list[str], hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: HF_HOME and offline mode are read when the libraries are imported."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    return subprocess.run([sys.executable, "-m", "rlphf_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # two fresh processes: about 15 s
def test_generate_and_train_rm_by_hub_name_offline(hf_home, tmp_path):
    out = tmp_path / "out.jsonl"
    result = rlphf(["generate", "--model", "org/tiny-chat", "--prompts", "hf:owner/prompts:train", "--out", str(out),
                    "--max-new-tokens", "4", "--run-dir", str(tmp_path / "run")], hf_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"h{i}" for i in range(5)]
    assert records[0]["instruction"] == "Explain hub topic 0."

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    pairs = write_pairs(tmp_path / "P2A.jsonl", "P2A")
    result = rlphf(["train-rm", "--model", "org/tiny-chat", "--prefs", "P2A", "--data", str(pairs), "--recipe",
                    str(recipe), "--run-dir", str(tmp_path / "run")], hf_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rm = tmp_path / "run" / "rm" / "P2A"
    assert json.loads((rm / "metrics.json").read_text())["base_model"] == "org/tiny-chat"
    assert json.loads((rm / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-chat"


def test_a_hub_name_neither_cached_nor_reachable_is_one_line(tmp_path, tiny_random_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Explain sun"}) + "\n")
    result = runner.invoke(app, ["generate", "--model", MISSING_MODEL, "--prompts", str(prompts), "--out",
                                 str(tmp_path / "out.jsonl")])
    one_error_line(result, f"model '{MISSING_MODEL}' is not in the Hugging Face cache", "HF_HUB_OFFLINE=1",
                   f"hf download {MISSING_MODEL}")

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    pairs = write_pairs(tmp_path / "P2A.jsonl", "P2A")
    result = runner.invoke(app, ["train-rm", "--model", MISSING_MODEL, "--prefs", "P2A", "--data", str(pairs),
                                 "--recipe", str(recipe), "--run-dir", str(tmp_path / "run")])
    one_error_line(result, f"model '{MISSING_MODEL}' is not in the Hugging Face cache")
    assert not (tmp_path / "run" / "rm").exists()

    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--prompts", f"hf:{MISSING_DATASET}",
                                 "--out", str(tmp_path / "out.jsonl")])
    one_error_line(result, f"dataset '{MISSING_DATASET}' is not in the Hugging Face cache",
                   f"hf download {MISSING_DATASET} --repo-type dataset")


def test_unreachable_hub_is_named_as_such(monkeypatch):
    """Online but without a route to the hub: huggingface_hub retries, then reports a missing local entry."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from rlphf_cli.errors import InputError
    from rlphf_cli.hub import require_model

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(InputError, match="not in the Hugging Face cache .* and the hub cannot be reached"):
        require_model(MISSING_MODEL)
