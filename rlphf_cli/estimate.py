"""GPU-hours a recipe implies, printed by `rlphf run RECIPE --dry-run`: an order of magnitude, not a
measurement.

What it counts, per stage, with P the base model's parameters and T tokens:
- training a LoRA adapter: 6 x P x T FLOPs (forward + backward, the usual rule; LoRA skips the frozen
  weights' gradients, so this over-counts by up to a third);
- a forward pass that does not train (KL reference, reward-model scoring, DPO reference): 2 x P x T;
- decoding (rollouts, RL completions, evaluation outputs): 2 x P x T at a far lower utilisation.
Tokens: every sequence at its longest, PROMPT_TOKENS of prompt plus the recipe's new-token limit
(TRL's max_length where it cuts). Examples: max_steps x batch x gradient accumulation when max_steps
is set, else dataset size x epochs (TRL's defaults where the recipe says nothing). Reward models are
LoRA adapters on the same base (P each). Judging and annotation call an API: not counted.
Time: FLOPs / (GPU peak x utilisation). Peaks are dense bf16: A100 312 TFLOP/s, H100 SXM 989 TFLOP/s.
Utilisation: TRAIN_MFU for training and scoring (HF Trainer + DDP at 7B), DECODE_MFU for
transformers' generate at batch 16, which is memory-bound (vLLM decodes several times faster).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from rlphf_cli.recipe import Recipe

PROMPT_TOKENS = 128  # an Alpaca instruction in the Tulu template plus up to three preference prompts
A100_PEAK = 312e12
H100_PEAK = 989e12
TRAIN_MFU = 0.40
DECODE_MFU = 0.05


def parameter_count(model_name: str) -> float | None:
    """From config.json (a local folder, or the Hugging Face cache) on the meta device; else from a size
    in the name ('allenai/tulu-2-7b' -> 7e9); None when neither tells."""
    config_path = Path(model_name).expanduser() / "config.json"
    if not config_path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_name, "config.json") if not Path(model_name).exists() else None
        config_path = Path(cached) if isinstance(cached, str) else None
    if config_path is not None:
        try:
            return _count_from_config(config_path)
        except (ValueError, KeyError, OSError, json.JSONDecodeError):
            pass
    match = re.search(r"(\d+(?:\.\d+)?)\s*([bm])\b", model_name.lower())
    if match:
        return float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6)
    return None


def _count_from_config(config_path: Path) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return float(sum(p.numel() for p in model.parameters()))


def _trl_defaults(class_name: str) -> dict:
    import trl

    return {f.name: f.default for f in dataclasses.fields(getattr(trl, class_name))}


def _examples(section: dict, defaults: dict, dataset_size: float) -> float:
    """How many examples (pairs, or completions for RL) training goes through."""
    settings = {**defaults, **section}
    if settings.get("max_steps", -1) and float(settings["max_steps"]) > 0:
        return float(settings["max_steps"]) * settings["per_device_train_batch_size"] * settings[
            "gradient_accumulation_steps"]
    return dataset_size * float(settings["num_train_epochs"])


def _prompt_count(spec: str, limit: int | None) -> float | None:
    """The recipe's limit, else the size of a local or built-in prompt set (a hub set is not fetched)."""
    if limit:
        return float(limit)
    if spec.startswith("hf:"):
        return None
    from rlphf_cli.data import load_prompts

    return float(len(load_prompts(spec)))


def estimate_gpu_hours(recipe: Recipe) -> dict | None:
    """GPU-hours per stage on one A100 (and the total on an H100); None for the built-in tiny model or
    when the model size or the number of prompts cannot be known offline."""
    if recipe.model.name == "tiny":
        return None
    params = parameter_count(recipe.model.name)
    n_train = _prompt_count(recipe.data.train_prompts, recipe.data.max_train_prompts)
    n_eval = _prompt_count(recipe.data.eval_prompts, recipe.data.max_eval_prompts)
    if params is None or n_train is None or n_eval is None:
        return None
    prefs = recipe.preference_set()
    new_tokens = recipe.generate.max_new_tokens
    sequence = PROMPT_TOKENS + new_tokens
    train_rate, decode_rate = A100_PEAK * TRAIN_MFU, A100_PEAK * DECODE_MFU

    def hours(train_flops: float = 0.0, decode_flops: float = 0.0) -> float:
        return (train_flops / train_rate + decode_flops / decode_rate) / 3600

    pairs = n_train * recipe.annotate.pairs_per_prompt
    rm = {**_trl_defaults("RewardConfig"), **recipe.train_rm.trl}
    rm_tokens = _examples(recipe.train_rm.trl, rm, pairs) * 2 * min(sequence, rm["max_length"] or sequence)
    n_rms = len(prefs) + ("rlhf" in recipe.evaluation.baselines)

    def policy_hours(reward_models: int) -> float:
        algo = recipe.train_policy.algo
        section = getattr(recipe.train_policy, algo)
        config = {**_trl_defaults(f"{algo.upper()}Config" if algo != "rloo" else "RLOOConfig"), **section}
        if algo == "dpo":
            tokens = _examples(section, config, pairs) * 2 * min(sequence, config["max_length"] or sequence)
            return hours(train_flops=(6 + 2) * params * tokens)
        completions = _examples(section, config, n_train * config["num_generations"])
        tokens = completions * (PROMPT_TOKENS + config["max_completion_length"])
        forwards = 2 * (config["beta"] > 0) + 2 * reward_models
        return hours(train_flops=(6 + forwards) * params * tokens, decode_flops=2 * params * tokens)

    combos = math.prod(len(options) for options in prefs.dimensions.values())
    generating = ["psoups"] + [b for b in recipe.evaluation.baselines if b != "base"]
    files = 1 + combos * len(generating) + len(prefs) + len(recipe.evaluation.sweep.weights if recipe.evaluation.sweep else [])
    trained_baselines = [b for b in recipe.evaluation.baselines if b in ("morl", "rlhf")]
    stages = {
        "rollouts": hours(decode_flops=2 * params * n_train * recipe.annotate.num_samples * sequence),
        "train-rm": n_rms * hours(train_flops=6 * params * rm_tokens),
        "train-policy": len(prefs) * policy_hours(1),
        "baselines": sum(policy_hours(len(prefs.dimensions) if b == "morl" else 1) for b in trained_baselines),
        "evaluate": hours(decode_flops=2 * params * files * n_eval * sequence),
    }
    total = sum(stages.values())
    return {"params": params, "stages": {k: v for k, v in stages.items() if v > 0}, "total": total,
            "total_h100": total * A100_PEAK / H100_PEAK, "gpu": "one A100",
            "basis": f"{TRAIN_MFU:.0%} of bf16 peak to train, {DECODE_MFU:.0%} to decode"}
