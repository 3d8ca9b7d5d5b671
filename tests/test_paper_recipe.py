"""recipes/psoups-paper.yaml runs end to end on CPU with only the model, the data, the judge and the step
counts swapped for tiny ones; every other setting (LoRA sizes, learning rates, gradient accumulation,
the Tulu prompt format, bf16, the baselines and the sweep) is used as the recipe writes it.

What cannot run on CPU as written: nothing in this recipe. `bf16: auto` is bf16 on a GPU that has it,
CPU bf16 autocast on a CPU with native bf16 (the trainers get `use_cpu` on a machine without CUDA;
without it transformers refuses bf16 there), float32 on other CPUs, where bf16 is emulated. The
openai judge needs an API and is what the judge swap replaces. GPU-only settings the recipe does not
use: `model.load_in_4bit` (bitsandbytes) and TRL's `use_vllm`.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_training import one_thread  # noqa: F401 - autouse: one torch thread for the tiny model
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.data import load_prompts
from rlphf_cli.recipe import builtin_recipes_dir

runner = CliRunner()


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.slow
def test_paper_recipe_runs_with_only_model_data_judge_and_steps_swapped(tmp_path, tiny_model):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    # 8 prompts: one RLOO generation batch of the recipe (4 per device x 8 accumulation / 4 generations).
    train.write_text("".join(json.dumps(r) + "\n" for r in load_prompts("builtin:tiny-train")[:8]))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in load_prompts("builtin:tiny-eval")[:1]))
    swaps = {
        "model.name": str(tiny_model),
        "data.train_prompts": str(train),
        "data.eval_prompts": str(evaluation),
        "annotate.judge": "rubric",
        "judge.backend": "rubric",
        "train_rm.trl.max_steps": 1,
        "train_policy.rloo.max_steps": 1,
    }
    run = tmp_path / "run"
    sets = [arg for key, value in swaps.items() for arg in ("--set", f"{key}={value}")]
    result = runner.invoke(app, ["run", "psoups-paper", "--run-dir", str(run), *sets])
    assert result.exit_code == 0, result.output

    written = yaml.safe_load((builtin_recipes_dir() / "psoups-paper.yaml").read_text())
    resolved = leaves(yaml.safe_load((run / "recipe.yaml").read_text()))
    for key, value in leaves(written).items():
        if key not in swaps:
            assert resolved[key] == value, key
    assert resolved["train_rm.trl.bf16"] == "auto" and resolved["train_policy.rloo.gradient_accumulation_steps"] == 8

    for pref in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B"):
        rm = json.loads((run / "rm" / pref / "adapter_config.json").read_text())
        policy = json.loads((run / "policy" / pref / "adapter_config.json").read_text())
        assert (rm["r"], rm["lora_alpha"], policy["r"], policy["lora_alpha"]) == (8, 32, 16, 32)
    summary = json.loads((run / "policy" / "P2A" / "training.json").read_text())
    assert summary["prompt_format"] == "tulu" and summary["steps"] == 1
    assert (run / "policy" / "morl" / "adapter_model.safetensors").exists()  # the recipe's P-MORL baseline
    assert len(list((run / "soups").glob("P*+P*+P*/soup.json"))) == 8
    assert (run / "report" / "report.md").exists() and (run / "report" / "sweep.png").exists()

    # The configs the run built: bf16 where this CPU has it, on CPU through use_cpu.
    from rlphf_cli.jobs import model_spec, trainer_spec
    from rlphf_cli.models.device import cpu_has_fast_bf16
    from rlphf_cli.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    for algo in ("reward", "rloo"):
        config = trainer_spec(recipe, algo).config(model_spec(recipe), str(tmp_path / "config"))
        assert config.bf16 is cpu_has_fast_bf16() and config.use_cpu is True
        assert config.gradient_accumulation_steps == 8


def test_the_recorded_recipe_keeps_token_limits_and_drops_secrets(monkeypatch):
    """recipe.yaml must run again as is: 'max_new_tokens' is a setting; the value of the variable a
    `*_env` key names is a secret, wherever it would appear."""
    from rlphf_cli.jobs import run_record
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.runs import register_secrets, scrub

    monkeypatch.setenv("PAPER_TEST_KEY", "sk-paper-test-secret")
    recipe = load_recipe("psoups-paper", ["judge.openai.api_key_env=PAPER_TEST_KEY"])
    register_secrets(run_record(recipe).secrets)
    record = scrub({"generate": {"max_new_tokens": 512}, "judge": {"openai": {"max_tokens": 32,
                    "api_key_env": "PAPER_TEST_KEY"}}, "note": "called with sk-paper-test-secret"})
    assert record == {"generate": {"max_new_tokens": 512}, "judge": {"openai": {"max_tokens": 32,
                      "api_key_env": "PAPER_TEST_KEY"}}, "note": "called with <secret>"}
