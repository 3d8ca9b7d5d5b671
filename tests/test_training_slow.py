"""Learning on the embedded tiny model: a P2A reward model trained on rubric-labelled pairs of the
model's own samples, then the tiny recipe's RLOO steps against it; DPO and P-MORL write loadable adapters.

Budget: under ~3 min on 2 cores beyond building the tiny model (cached after the first time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlphf_cli.jobs import policy_jobs, reward_model_jobs

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a busy 2-core machine two torch threads make these models 5-20x slower (OpenMP waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

N_TRAIN_PROMPTS = None  # all 435: ~400 pairs, as in the demo
MAX_NEW_TOKENS = 48


def generate(model_dir: str, instructions: list[str], *, adapter: Path | None = None, num_samples: int = 1,
             greedy: bool = False, seed: int = 0) -> list[list[str]]:
    """Responses per instruction (chat template, like the policy sees it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    torch.manual_seed(seed)
    out: list[list[str]] = []
    with torch.inference_mode():
        for start in range(0, len(instructions), 64):
            batch = instructions[start:start + 64]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": i}], tokenize=False,
                                                   add_generation_prompt=True) for i in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(**enc, do_sample=not greedy, temperature=None if greedy else 1.0, top_k=0,
                                 max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=num_samples,
                                 pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [decoded[i:i + num_samples] for i in range(0, len(decoded), num_samples)]
    return out


def measure_p2a(text: str) -> float:
    try:
        from rlphf_cli.judges.rubric import measure
    except ImportError:  # the rubric's P2A measure: minus the word count
        return -float(len(text.split()))
    return measure("P2A", text)


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """Rubric-labelled P2A pairs from the tiny model's own samples, and a trained P2A reward model."""
    from rlphf_cli.data import load_prompts
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training.reward import train_reward_model

    run = tmp_path_factory.mktemp("tiny-run")
    records = load_prompts("builtin:tiny-train", N_TRAIN_PROMPTS)
    samples = generate(str(tiny_model), [r["instruction"] for r in records], num_samples=2)
    rows = []
    for record, (a, b) in zip(records, samples, strict=True):
        ma, mb = measure_p2a(a), measure_p2a(b)
        if abs(ma - mb) / max(abs(ma), abs(mb), 1.0) < 0.05:  # the rubric's default tie margin
            continue
        chosen, rejected = (a, b) if ma > mb else (b, a)
        rows.append({"prompt": record["instruction"], "chosen": chosen, "rejected": rejected, "id": record["id"],
                     "preference": "P2A"})
    (run / "annotations").mkdir()
    (run / "annotations" / "P2A.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(None, [f"run_dir={run}", "train_rm.eval_fraction=0.2", f"model.name={tiny_model}"])
    metrics = train_reward_model(reward_model_jobs(recipe, "P2A")[0])  # ~80 held-out pairs
    return {"run": run, "recipe": recipe, "rm": metrics, "pairs": len(rows)}


def test_p2a_reward_model_is_accurate_on_held_out_pairs(tiny_run):
    metrics = tiny_run["rm"]
    print(f"P2A RM: {metrics['accuracy']:.1%} held-out accuracy on {metrics['pairs_eval']} pairs "
          f"({metrics['pairs_train']} train, {metrics['train_s']:.1f} s, {metrics['s_per_step']:.3f} s/step)")
    assert metrics["pairs_eval"] >= 50
    assert metrics["accuracy"] >= 0.85
    assert metrics["mean_margin"] > 0


def test_rloo_raises_the_reward_of_greedy_answers(tiny_run, tiny_model):
    from rlphf_cli.data import load_prompts
    from rlphf_cli.training.policy import train_policy
    from rlphf_cli.training.reward import RewardScorer

    result = train_policy(policy_jobs(tiny_run["recipe"], "concise")[0])
    assert result["steps"] == tiny_run["recipe"].train_policy.rloo["max_steps"]
    eval_prompts = [r["instruction"] for r in load_prompts("builtin:tiny-eval")]
    scorer = RewardScorer(tiny_run["run"] / "rm" / "P2A")
    before = [s[0] for s in generate(str(tiny_model), eval_prompts, greedy=True)]
    after = [s[0] for s in generate(str(tiny_model), eval_prompts, greedy=True, adapter=Path(result["out_dir"]))]
    score_before = sum(scorer.score(eval_prompts, before)) / len(before)
    score_after = sum(scorer.score(eval_prompts, after)) / len(after)
    words_before = sum(len(t.split()) for t in before) / len(before)
    words_after = sum(len(t.split()) for t in after) / len(after)
    print(f"RLOO {result['steps']} steps ({result['s_per_step']:.2f} s/step): greedy RM score {score_before:.3f} -> "
          f"{score_after:.3f}, words {words_before:.1f} -> {words_after:.1f}")
    assert score_after > score_before


def test_dpo_and_morl_write_loadable_adapters(tiny_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training.policy import train_policy

    run = tiny_run["run"]
    recipe = load_recipe(None, [f"run_dir={run}", "preferences.use=[P2A,P2B]", "train_policy.dpo.max_steps=4",
                                "train_policy.rloo.max_steps=3", f"model.name={tiny_model}"])
    dpo = train_policy(policy_jobs(recipe, "P2A", algo="dpo", out=run / "policy" / "dpo-P2A")[0])
    assert dpo["steps"] == 4
    if not (run / "rm" / "P2B").exists():  # morl routing needs one RM per preference; a copy will do here
        shutil.copytree(run / "rm" / "P2A", run / "rm" / "P2B")
    morl = train_policy(policy_jobs(recipe, mode="morl")[0])
    assert morl["steps"] == 3 and set(morl["rewards_end"]) <= {"P2A", "P2B"}
    for folder in (dpo["out_dir"], morl["out_dir"]):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), folder)
