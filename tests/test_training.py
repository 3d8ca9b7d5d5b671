"""train-rm / train-policy on the random tiny fixture: artifacts, metrics, errors, resume.

Step counts are tiny: these check the plumbing (TRL + PEFT wiring, folders, messages), not learning;
tests/test_training_slow.py checks learning on the embedded tiny model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from helpers import one_error_line
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.jobs import policy_jobs, reward_model_jobs

runner = CliRunner()
WORDS = "plants sun water air rock hot gravity pulls friend great question".split()

RECIPE = {
    "seed": 0,
    "train_rm": {"trl": {"learning_rate": 5.0e-3, "num_train_epochs": 1, "per_device_train_batch_size": 8,
                         "max_length": 96}},
    "train_policy": {
        "rloo": {"learning_rate": 1.0e-3, "max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                 "max_completion_length": 8},
        "dpo": {"learning_rate": 5.0e-4, "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 96},
        "sft": {"learning_rate": 5.0e-4, "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 96},
    },
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hidden-32 models: ops far too small for threads, and on a busy 2-core machine OpenMP spinning
    makes them 5-10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_pairs(path: Path, pref: str, n: int = 24, seed: int = 0) -> Path:
    """Short responses chosen over long ones (what the rubric's P2A measure prefers)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        short = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        long = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 18)))
        rows.append({"prompt": f"Explain {rng.choice(WORDS)} {i}", "chosen": short, "rejected": long,
                     "id": f"p{i}", "preference": pref})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(tmp_path):
    """A run directory with P2A annotations, training prompts and a small recipe."""
    run = tmp_path / "run"
    write_pairs(run / "annotations" / "P2A.jsonl", "P2A")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Explain topic {i}"}) + "\n" for i in range(8)))
    recipe = dict(RECIPE, data={"train_prompts": str(prompts)})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    return {"run": run, "recipe": recipe_path, "prompts": prompts}


def base_args(setup, model) -> list[str]:
    return ["--recipe", str(setup["recipe"]), "--run-dir", str(setup["run"]), "--model", str(model)]


def load(setup, *sets: str):
    from rlphf_cli.recipe import load_recipe

    return load_recipe(setup["recipe"], [f"run_dir={setup['run']}", *sets])


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A second random model whose tokenizer differs from the fixture's (other texts, other vocab)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlphf_cli.models.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("other-tokenizer")
    texts = [f"{a} {b} {c}." for a in WORDS for b in WORDS for c in ("yes", "no", "maybe")]
    tokenizer = build_tokenizer(texts, vocab_size=290)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# Pieces


def test_trainer_config_device_defaults_and_pass_through(tmp_path, setup):
    from rlphf_cli.jobs import model_spec, trainer_spec

    recipe = load(setup, "train_policy.rloo.beta=0.1", "train_policy.rloo.learning_rate=5e-4")
    config = trainer_spec(recipe, "rloo").config(model_spec(recipe), str(tmp_path / "out"))
    assert config.bf16 is False and config.activation_checkpointing is False  # CPU defaults
    assert config.beta == 0.1 and config.max_steps == 2
    assert config.learning_rate == 5e-4  # YAML reads '5e-4' as a string; coerced for a float field
    assert config.model_init_kwargs["dtype"] == "float32"
    recipe = load(setup, "train_policy.rloo.bf16=false", "train_policy.rloo.gradient_checkpointing=true")
    assert trainer_spec(recipe, "rloo").config(model_spec(recipe), str(tmp_path / "o")).activation_checkpointing is True


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_is_bf16_only_where_the_cpu_has_it(tmp_path, setup, monkeypatch, native):
    """The gemma-270m recipe's `bf16: auto`: CPU bf16 autocast only with AVX512-BF16/AMX; on an
    AVX2-only CPU it is emulated and slower than float32."""
    from rlphf_cli.jobs import model_spec, trainer_spec
    from rlphf_cli.models import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: native)
    recipe = load(setup, "train_rm.trl.bf16=auto")
    spec = trainer_spec(recipe, "reward")
    assert spec.get("bf16") == "auto"  # recorded as written; resolved when the config is built
    config = spec.config(model_spec(recipe), str(tmp_path / "out"))
    assert config.bf16 is native and config.use_cpu is True
    from rlphf_cli.recipe import recipe_warnings

    assert not [line for line in recipe_warnings(recipe) if ".bf16 true" in line]
    warned = [line for line in recipe_warnings(load(setup, "train_rm.trl.bf16=true")) if ".bf16 true" in line]
    assert bool(warned) is not native and all("train_rm.trl.bf16 true" in line for line in warned)
    weights = [line for line in recipe_warnings(load(setup, "model.dtype=bfloat16")) if "model.dtype" in line]
    assert bool(weights) is not native and not [line for line in recipe_warnings(recipe) if "model.dtype" in line]


def test_unknown_trl_key_is_named(setup, tiny_random_model):
    result = runner.invoke(app, ["train-rm", "--pref", "P2A", *base_args(setup, tiny_random_model),
                                 "--set", "train_rm.trl.lerning_rate=0.1"])
    one_error_line(result, "train_rm.trl.lerning_rate", "unknown RewardConfig field", "learning_rate")


def test_lora_configs_follow_the_recipe(setup):
    from rlphf_cli.jobs import lora_spec

    recipe = load(setup)
    rm = lora_spec(recipe.train_rm.lora).peft_config("SEQ_CLS")
    assert (rm.r, rm.lora_alpha, rm.lora_dropout, rm.modules_to_save) == (8, 32, 0.1, ["score"])
    policy = lora_spec(recipe.train_policy.lora).peft_config("CAUSAL_LM")
    assert (policy.r, policy.lora_alpha, policy.lora_dropout) == (16, 32, 0.05)


def test_lora_dropout_survives_trls_disable_dropout(tiny_random_model):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.utils import disable_dropout_in_model

    from rlphf_cli.specs import LoraSpec
    from rlphf_cli.training.reward import restore_lora_dropout

    base = AutoModelForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1)
    base.model.layers[0].self_attn.attention_dropout = 0.0
    extra = base.model.extra_dropout = torch.nn.Dropout(0.2)  # stands for a base model's own dropout
    model = get_peft_model(base, LoraSpec(lora_dropout=0.1).peft_config("SEQ_CLS"))
    disable_dropout_in_model(model)  # what RewardTrainer does with disable_dropout=True
    lora = [m for n, m in model.named_modules() if ".lora_dropout." in f"{n}." and isinstance(m, torch.nn.Dropout)]
    assert lora and all(m.p == 0 for m in lora)
    assert restore_lora_dropout(model, 0.1) == 0.1
    assert all(m.p == 0.1 for m in lora) and extra.p == 0


def test_split_is_seeded_and_by_prompt():
    from rlphf_cli.training.reward import split_pairs

    pairs = [{"id": f"p{i // 2}", "n": i} for i in range(40)]  # two pairs per prompt
    train, held = split_pairs(pairs, 0.25, seed=3)
    assert (train, held) == split_pairs(pairs, 0.25, seed=3)
    assert len(held) == 10 and not {p["id"] for p in train} & {p["id"] for p in held}
    assert split_pairs(pairs, 0.25, seed=4)[1] != held


def test_morl_reward_routes_each_sample_to_its_preferences():
    from rlphf_cli.training.policy import RMReward

    class Fake:
        def __init__(self, value):
            self.value, self.calls = value, []

        def score(self, instructions, responses):
            self.calls.append(list(instructions))
            return [self.value] * len(responses)

    fake = Fake(2.0)
    reward = RMReward(fake, "P2A", route=True)
    out = reward(prompts=["a", "b", "c"], completions=[[{"role": "assistant", "content": "x"}]] * 3,
                 instruction=["i0", "i1", "i2"], prefs=[["P1A", "P2A"], ["P1A", "P2B"], ["P2A"]])
    assert out == [2.0, None, 2.0] and fake.calls == [["i0", "i2"]]
    assert reward.__name__ == "rm_P2A"
    assert RMReward(fake, "P2A")(prompts=["a"], completions=["y"], instruction=["i"], prefs=[[]]) == [2.0]


def test_running_stats_match_the_whole_sample_and_standardize():
    import torch

    from rlphf_cli.training.policy import RunningStats

    values = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 7 + 3
    stats = RunningStats()
    for chunk in values.split(6):
        stats.update(chunk.tolist())
    assert stats.count == 50
    assert stats.mean == pytest.approx(float(values.mean()), rel=1e-9)
    assert stats.std == pytest.approx(float(values.std(unbiased=False)), rel=1e-9)
    assert stats.standardize(stats.mean + stats.std) == pytest.approx(1.0)
    assert RunningStats().std == 1.0  # nothing seen yet: no scaling


def test_morl_standardizes_each_reward_model_so_the_widest_does_not_decide():
    """Two reward models that rank the same answers oppositely, one on a 100x wider scale: the raw mean
    follows the wide one; standardized, each contributes alike and the mean is flat."""
    from rlphf_cli.training.policy import RMReward

    class Scaled:
        def __init__(self, scale):
            self.scale = scale

        def score(self, instructions, responses):
            return [self.scale * len(r) for r in responses]

    completions = ["a", "bb", "ccc", "dddd"]
    kwargs = {"prompts": ["p"] * 4, "completions": completions, "instruction": ["i"] * 4, "prefs": [["X", "Y"]] * 4}

    def mean_reward(standardize):
        wide = RMReward(Scaled(100.0), "X", route=True, standardize=standardize)
        narrow = RMReward(Scaled(-1.0), "Y", route=True, standardize=standardize)
        return [(x + y) / 2 for x, y in zip(wide(**kwargs), narrow(**kwargs), strict=True)], wide

    raw, _ = mean_reward(False)
    assert raw == sorted(raw) and raw[-1] - raw[0] > 100  # the wide model decides
    fair, wide = mean_reward(True)
    assert max(abs(v) for v in fair) < 1e-9
    assert wide.stats.count == 4 and wide.stats.mean == pytest.approx(250.0)


def test_morl_jobs_standardize_by_default_and_the_recipe_switches_it_off(setup, tiny_random_model):
    recipe = load(setup, f"model.name={tiny_random_model}")
    assert policy_jobs(recipe, mode="morl")[0].standardize_rewards is True
    assert policy_jobs(recipe, "concise")[0].standardize_rewards is False  # the experts each have one RM
    off = load(setup, f"model.name={tiny_random_model}", "train_policy.standardize_rewards=false")
    assert policy_jobs(off, mode="morl")[0].standardize_rewards is False


# --------------------------------------------------------------------------------------------
# train-rm


def test_train_rm_writes_adapter_metrics_and_scores(setup, tiny_random_model):
    from rlphf_cli.training.reward import RewardScorer

    result = runner.invoke(app, ["train-rm", "--pref", "concise", *base_args(setup, tiny_random_model)])
    assert result.exit_code == 0, result.output
    assert "P2A" in result.output and "held-out" in result.output
    rm = setup["run"] / "rm" / "P2A"
    adapter = json.loads((rm / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 32)
    metrics = json.loads((rm / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["pairs_eval"] >= 1
    assert metrics["lora_dropout"] == 0.1  # train_rm.lora.lora_dropout, despite TRL's disable_dropout
    assert metrics["pairs_train"] + metrics["pairs_eval"] == 24
    steps = [json.loads(line) for line in (rm / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, metrics["steps"] + 1))
    assert (rm / "tokenizer.json").exists() and (setup["run"] / "recipe.yaml").exists()
    assert not [p for p in rm.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers

    scorer = RewardScorer(rm)
    scores = scorer.score(["Explain sun"] * 2, ["sun hot", "sun hot water air rock hot gravity pulls friend"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert RewardScorer(rm).score(["Explain sun"], ["sun hot"])[0] == pytest.approx(scores[0], abs=1e-5)

    # Retrained in place (same process, same folder): the scorer loads the new weights.
    from rlphf_cli.training.reward import train_reward_model

    job = reward_model_jobs(load(setup, "train_rm.trl.learning_rate=0.02", f"model.name={tiny_random_model}"),
                            "P2A")[0]
    train_reward_model(job, force=True)
    assert RewardScorer(rm).score(["Explain sun"], ["sun hot"])[0] != pytest.approx(scores[0], abs=1e-5)


def test_train_rm_errors(setup, tiny_random_model):
    result = runner.invoke(app, ["train-rm", "--prefs", "friendly", "--no-deps", *base_args(setup, tiny_random_model)])
    one_error_line(result, "2 inputs missing", "rollouts (", "annotate/P3A (", "go on with:")

    result = runner.invoke(app, ["train-rm", "--prefs", "all", "--no-deps", *base_args(setup, tiny_random_model)])
    # checked before training anything
    one_error_line(result, "6 inputs missing: rollouts (", "; annotate/P1A (", "annotate/P3B (", "go on with:")
    assert not (setup["run"] / "rm").exists()

    bad = setup["run"] / "annotations" / "P2B.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
    result = runner.invoke(app, ["train-rm", "--prefs", "P2B", *base_args(setup, tiny_random_model)])
    one_error_line(result, "no usable preference pairs", "1 skipped")
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n{torn")
    result = runner.invoke(app, ["train-rm", "--prefs", "P2B", *base_args(setup, tiny_random_model)])
    one_error_line(result, "P2B.jsonl: line 2: invalid JSON", "truncated")

    result = runner.invoke(app, ["train-rm", "--prefs", "concize", *base_args(setup, tiny_random_model)])
    one_error_line(result, "unknown preference 'concize'", "concise")


# --------------------------------------------------------------------------------------------
# train-policy


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_random_model):
    """One P2A reward model on the fixture, trained once for the policy tests."""
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training.reward import train_reward_model

    tmp = tmp_path_factory.mktemp("rm")
    recipe_path = tmp / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(RECIPE))
    recipe = load_recipe(recipe_path, [f"run_dir={tmp / 'run'}", f"model.name={tiny_random_model}"])
    job = reward_model_jobs(recipe, "P2A", data=write_pairs(tmp / "P2A.jsonl", "P2A"), out=tmp / "rm" / "P2A")[0]
    return Path(train_reward_model(job)["out_dir"])


@pytest.fixture
def with_rm(setup, trained_rm):
    shutil.copytree(trained_rm, setup["run"] / "rm" / "P2A")
    return setup


def test_train_policy_soup_writes_a_peft_adapter_and_metrics(with_rm, tiny_random_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["train-policy", "--prefs", "concise", *base_args(with_rm, tiny_random_model)])
    assert result.exit_code == 0, result.output
    assert "P2A" in result.output and "rloo" in result.output
    policy = with_rm["run"] / "policy" / "P2A"
    adapter = json.loads((policy / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and (adapter["r"], adapter["lora_alpha"]) == (16, 32)
    lines = [json.loads(line) for line in (policy / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert set(line["rewards"]) == {"P2A"} and "kl" in line and "completion_length" in line
        assert line["wall_s"] > 0
    summary = json.loads((policy / "training.json").read_text())
    assert summary["steps"] == 2 and summary["mode"] == "soup" and summary["preferences"] == ["P2A"]
    # Cut completions (max_completion_length 8 on a random model: most of them) train nothing.
    assert summary["mask_truncated_completions"] is True and summary["max_completion_length"] == 8
    assert 0 < summary["clipped_ratio_mean"] <= 1 and all("clipped_ratio" in line for line in lines)
    assert not [p for p in policy.parent.iterdir() if p.name.startswith(".")]  # checkpoints cleaned up
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_random_model), str(policy))


def test_reward_model_with_another_tokenizer(with_rm, tiny_random_model, other_tokenizer_model):
    """The policy's tokenizer and the RM's differ: each scores with its own tokenizer."""
    from rlphf_cli.training.policy import train_policy
    from rlphf_cli.training.reward import RewardScorer, train_reward_model

    other_rm = with_rm["run"] / "rm-other"
    train_reward_model(reward_model_jobs(load(with_rm, f"model.name={other_tokenizer_model}"), "P2A", out=other_rm)[0])
    assert RewardScorer(other_rm).tokenizer.vocab_size != RewardScorer(with_rm["run"] / "rm" / "P2A").tokenizer.vocab_size
    recipe = load(with_rm, f"model.name={tiny_random_model}")
    result = train_policy(policy_jobs(recipe, "P2A", reward_model=other_rm, out=with_rm["run"] / "policy" / "other")[0])
    assert result["steps"] == 2 and result["reward_models"] == {"P2A": str(other_rm)}


def test_train_policy_errors(setup, tiny_random_model):
    args = base_args(setup, tiny_random_model)
    result = runner.invoke(app, ["train-policy", "--prefs", "concise", "--no-deps", *args])
    one_error_line(result, "1 input missing: train-rm/P2A (", "go on with:")
    result = runner.invoke(app, ["train-policy", "--mode", "rlhf", *args])
    one_error_line(result, "rlphf train-rm --prefs general")
    result = runner.invoke(app, ["train-policy", "--mode", "morl", "--no-deps", *args])
    one_error_line(result, "12 inputs missing: rollouts (", "train-rm/P1A (", "train-rm/P3B (", "go on with:")
    result = runner.invoke(app, ["train-policy", *args])
    one_error_line(result, "give --prefs")
    result = runner.invoke(app, ["train-policy", "--mode", "morl", "--prefs", "P2A", *args])
    one_error_line(result, "--prefs does not apply to mode morl")
    result = runner.invoke(app, ["train-policy", "--mode", "morl", "--algo", "dpo", *args])
    one_error_line(result, "--algo dpo", "soup or rlhf")
    result = runner.invoke(app, ["train-policy", "--prefs", "friendly", "--algo", "dpo", "--no-deps", *args])
    one_error_line(result, "inputs missing", "annotate/P3A (", "go on with:")
    result = runner.invoke(app, ["train-policy", "--prefs", "P2A", "--algo", "ppo", *args])
    one_error_line(result, "--algo: unknown algorithm 'ppo'", "did you mean 'dpo'")


def test_dpo_and_morl_run(with_rm, tiny_random_model):
    """DPO from the annotations; morl over two preferences of one dimension (P2B's RM is a copy)."""
    from rlphf_cli.training.policy import train_policy

    recipe = load(with_rm, "preferences.use=[P2A,P2B]", f"model.name={tiny_random_model}")
    dpo = train_policy(policy_jobs(recipe, "concise", algo="dpo", out=with_rm["run"] / "policy" / "dpo")[0])
    assert dpo["steps"] == 2 and "margin_end" in dpo
    shutil.copytree(with_rm["run"] / "rm" / "P2A", with_rm["run"] / "rm" / "P2B")
    morl = train_policy(policy_jobs(recipe, mode="morl")[0])
    assert morl["name"] == "morl" and morl["preferences"] == ["P2A", "P2B"]
    lines = [json.loads(line) for line in (with_rm["run"] / "policy" / "morl" / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[0]["rewards"]) == {"P2A", "P2B"}
    stats = json.loads((with_rm["run"] / "policy" / "morl" / "training.json").read_text())["reward_standardization"]
    # One dimension: each sample carries P2A or P2B, so each is scored by exactly one reward model.
    assert set(stats) == {"P2A", "P2B"} and sum(s["count"] for s in stats.values()) > 0, stats
    assert all(s["std"] > 0 for s in stats.values() if s["count"] > 1), stats


def test_multitask_fine_tunes_one_policy_on_every_preferences_chosen_responses(setup, tiny_random_model):
    """The paper's MT baseline: SFT on the judge-chosen response of each pair, the instruction
    carrying that pair's preference prompt; one policy for all preferences."""
    from rlphf_cli.training.common import load_tokenizer
    from rlphf_cli.training.policy import multitask_examples

    write_pairs(setup["run"] / "annotations" / "P3A.jsonl", "P3A", n=10, seed=1)
    args = base_args(setup, tiny_random_model)
    result = runner.invoke(app, ["train-policy", "--mode", "multitask", *args, "--set", "preferences.use=[P2A,P3A]"])
    assert result.exit_code == 0, result.output
    summary = json.loads((setup["run"] / "policy" / "multitask" / "training.json").read_text())
    assert summary["algo"] == "sft" and summary["preferences"] == ["P2A", "P3A"]
    assert summary["pairs_per_preference"] == {"P2A": 24, "P3A": 10} and summary["steps"] == 2
    assert (setup["run"] / "policy" / "multitask" / "adapter_model.safetensors").exists()

    recipe = load(setup, "preferences.use=[P2A,P3A]")
    pairs = {"P2A": [{"prompt": "Explain sun", "chosen": "Hot.", "rejected": "It is a star that is hot."}],
             "P3A": [{"prompt": "Explain rain", "chosen": "Haha, water!", "rejected": "Water."}]}
    rows = multitask_examples(policy_jobs(recipe, mode="multitask")[0], load_tokenizer(str(tiny_random_model)), pairs)
    prompts = [r[0]["content"] for r in rows["prompt"]]
    assert prompts[0] == "Explain sun " + recipe.preference_set().get("P2A").prompt
    assert prompts[1] == "Explain rain " + recipe.preference_set().get("P3A").prompt
    assert [r[0]["content"] for r in rows["completion"]] == ["Hot.", "Haha, water!"]

    missing = runner.invoke(app, ["train-policy", "--mode", "multitask", "--no-deps", *args,
                                  "--set", "preferences.use=[P2A,P2B]"])
    one_error_line(missing, "inputs missing", "annotate/P2B (", "go on with:")
    short = runner.invoke(app, ["train-policy", "--mode", "multitask", *args, "--set", "preferences.use=[P2A,P3A]",
                                "--set", "train_policy.sft.max_length=4", "--force"])
    one_error_line(short, "train_policy.sft.max_length 4", "raise it")


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(with_rm, tiny_random_model):
    from rlphf_cli.training.policy import TrainingInterrupted, train_policy

    job = policy_jobs(load(with_rm, "train_policy.rloo.max_steps=4", f"model.name={tiny_random_model}"), "P2A")[0]
    out = with_rm["run"] / "policy" / "P2A"

    sent = []

    def interrupt_at_two(done, total):
        if done == 2 and not sent:  # one Ctrl-C (a second one stops at once)
            sent.append(done)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped at step 2; checkpoint saved") as stopped:
        train_policy(job, progress=interrupt_at_two)
    assert stopped.value.resume and stopped.value.exit_code == 130
    assert not out.exists()
    assert (out.parent / ".P2A.checkpoints" / "checkpoint-2").is_dir()

    seen = []
    result = train_policy(job, resume=True, progress=lambda done, total: seen.append(done))
    assert result["resumed_from"] == 2 and result["steps"] == 4
    assert seen[0] == 2 and seen[-1] == 4
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[2]["wall_s"] >= lines[1]["wall_s"]
    # `--prefs all --resume` after an interruption: policies finished before it are kept as they are.
    again = train_policy(job, resume=True)
    assert again["already_done"] and again["steps"] == 4
