"""LoRA policies: on-policy RL against reward models (TRL RLOO / GRPO) or DPO from annotations.

Modes (DESIGN.md, "Training"):
- soup: one policy per preference against that preference's reward model (the P-Soups experts);
  training prompts are the plain instructions, as in the paper.
- morl: one policy; each prompt carries a seeded combination of preference prompts (one per
  dimension) and its reward is the mean of the reward models of that combination.
- rlhf: one policy against the general reward model (rm/general).
- multitask: the paper's MT baseline, rejection-sampling distillation: one policy fine-tuned (TRL's
  SFTTrainer) on the judge-chosen response of every annotated pair of every preference, the
  instruction carrying that preference's prompt.
The KL reference of RL is the base model itself: the LoRA adapter switched off, no second copy.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from rlphf_cli.errors import InputError, Interrupted, RecipeError
from rlphf_cli.preferences import Preference
from rlphf_cli.prompting import instruction_with_preferences
from rlphf_cli.recipe import Recipe, check_trainer_fields
from rlphf_cli.runs import RunDir, read_jsonl
from rlphf_cli.training import GENERAL, is_main_process
from rlphf_cli.training.callbacks import ProgressFn, make_callbacks
from rlphf_cli.training.common import (
    begin_outputs,
    completion_example,
    completion_text,
    load_pairs,
    load_tokenizer,
    output_folders,
    prompt_example,
    publish,
    quiet_trainer,
    staging_dir,
)
from rlphf_cli.training.config import quantization_config, trainer_config
from rlphf_cli.training.lora import lora_config
from rlphf_cli.training.reward import RewardScorer, require_reward_model, resolve_rm_name

MODES = ("soup", "morl", "rlhf", "multitask")
ALGOS = {"rloo": ("RLOOConfig", "RLOOTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer"),
         "dpo": ("DPOConfig", "DPOTrainer"), "sft": ("SFTConfig", "SFTTrainer")}
OFFLINE = ("dpo", "sft")  # trained from annotations, no reward model
SUMMARY = "training.json"


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training: a checkpoint was saved (when checkpointing is on)."""


class RMReward:
    """A TRL reward function backed by one reward model. It scores the plain instruction (the
    dataset's `instruction` column) + the completion with the RM's own tokenizer. With `route`, it
    scores only samples whose `prefs` column holds its preference and returns None for the others
    (TRL's weighted nansum then averages the matching reward models)."""

    def __init__(self, scorer: RewardScorer, pref_id: str, route: bool = False):
        self.scorer = scorer
        self.pref_id = pref_id
        self.route = route
        self.__name__ = f"rm_{pref_id}"  # the name TRL logs rewards under

    def __call__(self, prompts, completions, completion_ids=None, instruction=None, prefs=None, **_):
        texts = [completion_text(c) for c in completions]
        if instruction is None:
            raise InputError("the training dataset has no 'instruction' column")
        if not self.route:
            return self.scorer.score(list(instruction), texts)
        picked = [i for i, ids in enumerate(prefs) if self.pref_id in ids]
        out: list[float | None] = [None] * len(texts)
        if picked:
            scores = self.scorer.score([instruction[i] for i in picked], [texts[i] for i in picked])
            for i, score in zip(picked, scores, strict=True):
                out[i] = score
        return out


def policy_name(mode: str, pref: Preference | None) -> str:
    return pref.id if mode == "soup" else mode


def sample_combination(prefs_by_dimension: dict[str, list[Preference]], rng: random.Random) -> list[Preference]:
    return [rng.choice(options) for options in prefs_by_dimension.values()]


def build_prompts(recipe: Recipe, tokenizer, records: list[dict], mode: str) -> dict[str, list]:
    """Columns of the RL dataset: prompt (what the policy sees), instruction (what RMs see), prefs."""
    fmt = recipe.model.prompt_format
    rng = random.Random(recipe.seed)
    dims = recipe.preference_set().dimensions
    columns: dict[str, list] = {"prompt": [], "instruction": [], "prefs": []}
    for record in records:
        combo = sample_combination(dims, rng) if mode == "morl" else []
        columns["prompt"].append(prompt_example(tokenizer, instruction_with_preferences(record["instruction"], combo),
                                                fmt))
        columns["instruction"].append(record["instruction"])
        columns["prefs"].append([p.id for p in combo])
    return columns


def multitask_examples(recipe: Recipe, tokenizer, pairs_by_pref: dict[str, list[dict]]) -> dict[str, list]:
    """SFT rows (TRL's prompt-completion format): each pair's instruction with its preference's prompt,
    and the response the judge chose for that preference."""
    fmt = recipe.model.prompt_format
    prefs = recipe.preference_set()
    columns: dict[str, list] = {"prompt": [], "completion": []}
    for pref_id, pairs in pairs_by_pref.items():
        pref = prefs.get(pref_id)
        for pair in pairs:
            columns["prompt"].append(prompt_example(tokenizer, instruction_with_preferences(pair["prompt"], [pref]), fmt))
            columns["completion"].append(completion_example(tokenizer, pair["chosen"], fmt))
    return columns


def train_policy(recipe: Recipe, *, pref: str | None = None, mode: str | None = None, algo: str | None = None,
                 model: str | None = None, reward_model: str | Path | None = None, prompts: str | None = None,
                 out_dir: str | Path | None = None, run_dir: str | Path | None = None, resume: bool = False,
                 progress: ProgressFn | None = None, force: bool = False) -> dict:
    """Train one LoRA policy; write policy/<name>/ (adapter, tokenizer, metrics.jsonl, training.json)
    and return a summary. `resume` continues from the last checkpoint when there is one; a policy
    of the run directory is replaced only with `force`."""
    import datasets
    import trl

    from rlphf_cli.data import load_prompts
    from rlphf_cli.models import resolve_model

    check_trainer_fields(recipe)
    mode = mode or recipe.train_policy.mode
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}' (choose from: {', '.join(MODES)})")
    if mode == "multitask":
        if algo not in (None, "sft"):
            raise InputError("--algo does not apply to mode multitask: it fine-tunes on the judge-chosen responses "
                             "(TRL SFT, settings in train_policy.sft)")
        algo = "sft"
    algo = algo or recipe.train_policy.algo
    if algo not in ALGOS or algo == "sft" and mode != "multitask":
        raise InputError(f"unknown algorithm '{algo}' (choose from: rloo, grpo, dpo)")
    preference = None
    if mode == "soup":
        if not pref:
            raise InputError("mode soup trains one policy per preference: give --prefs")
        preference = recipe.preference_set().get(pref)
    elif pref:
        raise InputError(f"--prefs does not apply to mode {mode}: it trains one policy for all preferences")
    if algo == "dpo" and mode == "morl":
        raise InputError("--algo dpo trains from one annotations file: use it with mode soup or rlhf")
    if reward_model is not None and (mode in ("morl", "multitask") or algo == "dpo"):
        raise InputError(f"--reward-model does not apply to {'--algo dpo' if algo == 'dpo' else 'mode ' + mode}")

    run = RunDir(run_dir or recipe.resolved_run_dir())
    name = policy_name(mode, preference)
    out_dir = Path(out_dir) if out_dir else run.policy(name)
    config_name, trainer_name = ALGOS[algo]
    rm_ids = _reward_ids(recipe, mode, preference)
    ckpt_dir = staging_dir(out_dir, "checkpoints")
    last = last_complete_checkpoint(ckpt_dir) if resume else None
    if resume and not last and (out_dir / SUMMARY).is_file():
        # Finished before the interruption (e.g. the first policies of `--prefs all`): keep it.
        return {**json.loads((out_dir / SUMMARY).read_text()), "out_dir": str(out_dir), "already_done": True}

    # Check every input before loading any model.
    rm_dirs = {}
    if algo == "dpo":
        pairs, skipped = load_pairs(run.annotations(rm_ids[0]), preference.alias if preference else GENERAL)
        data_counts = {"pairs": len(pairs), "pairs_skipped": skipped}
    elif algo == "sft":
        loaded = {rm_id: load_pairs(run.annotations(rm_id), resolve_rm_name(recipe, rm_id)[1]) for rm_id in rm_ids}
        pairs_by_pref = {rm_id: found for rm_id, (found, _) in loaded.items()}
        data_counts = {"pairs": sum(len(v) for v in pairs_by_pref.values()),
                       "pairs_per_preference": {k: len(v) for k, v in pairs_by_pref.items()},
                       "pairs_skipped": sum(n for _, n in loaded.values())}
    else:
        for rm_id in rm_ids:
            rm_dirs[rm_id] = require_reward_model(reward_model or run.reward_model(rm_id), resolve_rm_name(recipe, rm_id)[1])
        records = load_prompts(prompts or recipe.data.train_prompts, recipe.data.max_train_prompts)
        data_counts = {"prompts": len(records)}

    begin_outputs(recipe, [out_dir], force or bool(last), "pass --force to train it again, or --out")
    model_path = resolve_model(model or recipe.model.name)
    tokenizer = load_tokenizer(model_path, revision=recipe.model.revision,
                               trust_remote_code=recipe.model.trust_remote_code)
    tokenizer.padding_side = "left"
    fmt = recipe.model.prompt_format

    section = getattr(recipe.train_policy, algo)
    defaults: dict = {"save_strategy": "steps", "save_total_limit": 2}
    if algo not in OFFLINE:
        # A completion cut at max_completion_length is scored by the reward model as if it were a
        # finished answer (measured on the tiny run: a concise RM prefers the cut version of a long
        # answer in 36 of 40 cases); leave cut completions out of the policy loss.
        defaults["mask_truncated_completions"] = True
    fixed: dict = {}
    if recipe.train_policy.save_steps:
        fixed.update(save_strategy="steps", save_steps=recipe.train_policy.save_steps)
    if algo == "dpo":
        dataset = datasets.Dataset.from_dict({
            "prompt": [prompt_example(tokenizer, p["prompt"], fmt) for p in pairs],
            "chosen": [completion_example(tokenizer, p["chosen"], fmt) for p in pairs],
            "rejected": [completion_example(tokenizer, p["rejected"], fmt) for p in pairs],
        })
        reward_kwargs: dict = {}
    elif algo == "sft":
        dataset = datasets.Dataset.from_dict(multitask_examples(recipe, tokenizer, pairs_by_pref))
        reward_kwargs = {}
    else:
        dataset = datasets.Dataset.from_dict(build_prompts(recipe, tokenizer, records, mode))
        scorers = {rm_id: RewardScorer(path) for rm_id, path in rm_dirs.items()}
        funcs = [RMReward(scorers[rm_id], rm_id, route=mode == "morl") for rm_id in rm_ids]
        if mode == "morl" and "reward_weights" not in section:
            # nansum over the reward models that scored a sample, each weighted 1/dimensions: their mean.
            fixed["reward_weights"] = [1.0 / len(recipe.preference_set().dimensions)] * len(funcs)
        reward_kwargs = {"reward_funcs": funcs}
    args = trainer_config(recipe, config_name, str(ckpt_dir), defaults=defaults, **fixed)

    metrics_file = ckpt_dir / "metrics.jsonl"
    metrics_cb, progress_cb, interrupt_cb = make_callbacks(metrics_file, progress,
                                                           {f"rm_{rm_id}": rm_id for rm_id in rm_ids})
    if last:
        metrics_cb.truncate_after(_step_of(last))
    elif is_main_process() and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh start: old checkpoints would mix two runs

    trainer = getattr(trl, trainer_name)(
        model=model_path,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.train_policy.lora, "CAUSAL_LM"),
        quantization_config=quantization_config(recipe),
        callbacks=[cb for cb in (metrics_cb, progress_cb, interrupt_cb) if cb is not None],
        **reward_kwargs,
    )
    quiet_trainer(trainer)
    if algo == "sft" and len(trainer.train_dataset) == 0:  # TRL drops rows whose response is cut off entirely
        raise RecipeError(f"{recipe.source}: train_policy.sft.max_length {args.max_length}: every prompt fills it, "
                          "no response token is left to learn from; raise it")
    start = time.monotonic()
    start_step = trainer.state.global_step
    try:
        trainer.train(resume_from_checkpoint=last)
    finally:
        interrupt_cb.restore()
    wall = time.monotonic() - start
    if interrupt_cb.requested:
        saving = args.save_strategy != "no"
        saved = f"; checkpoint saved in {ckpt_dir}" if saving else "; no checkpoint (train_policy.save_steps is off)"
        raise TrainingInterrupted(f"training of policy '{name}' stopped at step {trainer.state.global_step}{saved}",
                                  resume=saving)

    records_logged = read_jsonl(metrics_file) if metrics_file.exists() else metrics_cb.records
    steps_run = trainer.state.global_step - (_step_of(last) if last else start_step)
    summary = {
        "name": name,
        "mode": mode,
        "algo": algo,
        "preferences": [preference.id] if preference else ([] if mode == "rlhf" else rm_ids),
        "reward_models": {k: str(v) for k, v in rm_dirs.items()},
        "base_model": model_path,
        "prompt_format": fmt,
        **({} if algo in OFFLINE else {"max_completion_length": args.max_completion_length,
                                       "mask_truncated_completions": args.mask_truncated_completions}),
        "steps": trainer.state.global_step,
        "resumed_from": _step_of(last) if last else None,
        "settings": recipe.settings("model", "data", "train_policy", "seed"),
        **data_counts,
        "wall_s": round(wall, 3),
        "s_per_step": round(wall / max(1, steps_run), 4),
        **_trend(records_logged),
    }
    publish(trainer, out_dir, {SUMMARY: summary}, copies={"metrics.jsonl": metrics_file})
    if is_main_process():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary["out_dir"] = str(out_dir)
    return summary


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-N that was saved whole. The Trainer writes trainer_state.json last, so a
    process killed while saving leaves a checkpoint without a readable one: resume from the one before."""
    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()),
                   key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True) if folder.is_dir() else []
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(checkpoint)
    return None


def _step_of(checkpoint: str) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def _reward_ids(recipe: Recipe, mode: str, preference: Preference | None) -> list[str]:
    if mode == "soup":
        return [preference.id]
    if mode == "rlhf":
        return [GENERAL]
    return [p.id for p in recipe.preference_set()]  # morl: their reward models; multitask: their annotations


def _trend(records: list[dict], window: int = 3) -> dict:
    """Mean reward / KL / length / clipped ratio over the first and last few logged steps (and the
    clipped ratio over all of them)."""
    out: dict = {}
    for key in ("reward", "kl", "completion_length", "clipped_ratio", "loss", "margin", "accuracy"):
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            out[f"{key}_start"] = sum(values[:window]) / len(values[:window])
            out[f"{key}_end"] = sum(values[-window:]) / len(values[-window:])
            if key == "clipped_ratio":
                out["clipped_ratio_mean"] = sum(values) / len(values)
    rewards = [r["rewards"] for r in records if isinstance(r.get("rewards"), dict)]
    if rewards:
        out["rewards_end"] = rewards[-1]
    return out


def train_policies(recipe: Recipe, prefs: str | None = None, *, mode: str | None = None, progress_factory=None,
                   out_dir: str | Path | None = None, force: bool = False, **kwargs) -> dict[str, dict]:
    """Mode soup with several preferences ('all', 'P1A,concise') trains them in turn; other modes
    train their one policy. With several, `out_dir` is a parent folder (<out_dir>/<id>)."""
    check_trainer_fields(recipe)
    mode = mode or recipe.train_policy.mode
    if mode != "soup":
        return {mode: train_policy(recipe, pref=prefs, mode=mode, out_dir=out_dir, force=force,
                                   progress=progress_factory(mode) if progress_factory else None, **kwargs)}
    if not prefs:
        raise InputError("mode soup trains one policy per preference: give --prefs (an id, an alias or 'all')")
    chosen = recipe.preference_set().resolve(prefs)
    if len(chosen) > 1 and kwargs.get("reward_model"):
        raise InputError("--reward-model names one reward model: use it with a single --prefs")
    run = RunDir(kwargs.get("run_dir") or recipe.resolved_run_dir())
    algo = kwargs.get("algo") or recipe.train_policy.algo
    for p in chosen:  # every input first: no half-done 'all' because the fifth one is missing
        if algo == "dpo":
            load_pairs(run.annotations(p.id), p.alias)
        elif not kwargs.get("reward_model"):
            require_reward_model(run.reward_model(p.id), p.alias)
    targets = output_folders([p.id for p in chosen], out_dir, run.policy)
    if not kwargs.get("resume"):  # resumed: finished ones are kept, the others continue
        begin_outputs(recipe, list(targets.values()), force, "pass --force to train it again, or --out")
    results = {}
    for p in chosen:
        results[p.id] = train_policy(recipe, pref=p.id, mode="soup", out_dir=targets[p.id], force=force,
                                     progress=progress_factory(p.id) if progress_factory else None, **kwargs)
    return results
