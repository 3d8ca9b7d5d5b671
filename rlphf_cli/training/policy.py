"""LoRA policies: on-policy RL against reward models (TRL RLOO / GRPO) or DPO from annotations.

Modes (DESIGN.md, "Training"):
- soup: one policy per preference against that preference's reward model (the P-Soups experts);
  training prompts are the plain instructions, as in the paper.
- morl: one policy; each prompt carries a seeded combination of preference prompts (one per
  dimension) and its reward is the mean of the reward models of that combination, each reward
  model's scores standardized first by its running mean and standard deviation
  (train_policy.standardize_rewards, on by default): reward models trained separately have
  unrelated scales, and the widest would otherwise decide the mean.
- rlhf: one policy against the general reward model (rm/general).
- multitask: the paper's MT baseline, rejection-sampling distillation: one policy fine-tuned (TRL's
  SFTTrainer) on the judge-chosen response of every annotated pair of every preference, the
  instruction carrying that preference's prompt.
The KL reference of RL is the base model itself: the LoRA adapter switched off, no second copy.
Every function takes a PolicyJob (rlphf_cli.specs), built by rlphf_cli.jobs.policy_jobs.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from rlphf_cli.errors import InputError, Interrupted, RecipeError
from rlphf_cli.prompting import instruction_with_preferences
from rlphf_cli.runs import begin_outputs, read_jsonl
from rlphf_cli.specs import PolicyJob, PromptedPreference, record
from rlphf_cli.training import is_main_process
from rlphf_cli.training.callbacks import ProgressFn, make_callbacks
from rlphf_cli.training.common import (
    completion_example,
    completion_text,
    load_pairs,
    load_tokenizer,
    prompt_example,
    publish,
    quiet_trainer,
    staging_dir,
)
from rlphf_cli.training.reward import RewardScorer, require_reward_model

SUMMARY = "training.json"


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training: a checkpoint was saved (when checkpointing is on)."""


class RMReward:
    """A TRL reward function backed by one reward model. It scores the plain instruction (the
    dataset's `instruction` column) + the completion with the RM's own tokenizer. With `route`, it
    scores only samples whose `prefs` column holds its preference and returns None for the others
    (TRL's weighted nansum then averages the matching reward models)."""

    def __init__(self, scorer: RewardScorer, pref_id: str, route: bool = False, standardize: bool = False):
        self.scorer = scorer
        self.pref_id = pref_id
        self.route = route
        self.stats = RunningStats() if standardize else None
        self.__name__ = f"rm_{pref_id}"  # the name TRL logs rewards under

    def __call__(self, prompts, completions, completion_ids=None, instruction=None, prefs=None, **_):
        texts = [completion_text(c) for c in completions]
        if instruction is None:
            raise InputError("the training dataset has no 'instruction' column")
        if not self.route:
            return self._standardized(self.scorer.score(list(instruction), texts))
        picked = [i for i, ids in enumerate(prefs) if self.pref_id in ids]
        out: list[float | None] = [None] * len(texts)
        if picked:
            scores = self._standardized(self.scorer.score([instruction[i] for i in picked], [texts[i] for i in picked]))
            for i, score in zip(picked, scores, strict=True):
                out[i] = score
        return out

    def _standardized(self, scores: list[float]) -> list[float]:
        if self.stats is None:
            return scores
        self.stats.update(scores)
        return [self.stats.standardize(s) for s in scores]


class RunningStats:
    """Running mean and standard deviation of every score seen so far (Chan et al.'s parallel
    update, as TRL's RunningMoments for PPO's score normalization). Scores are standardized with
    the statistics that include their own batch, so the first batch is centred too."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Sequence[float]) -> None:
        n = len(values)
        if not n:
            return
        mean = sum(values) / n
        m2 = sum((v - mean) ** 2 for v in values)
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def standardize(self, value: float) -> float:
        # A reward model that scored everything alike so far: centred, not blown up.
        return (value - self.mean) / max(self.std, 1e-6)

    def to_record(self) -> dict:
        return {"count": self.count, "mean": round(self.mean, 6), "std": round(self.std, 6)}


def dimensions(prefs: tuple[PromptedPreference, ...]) -> dict[str, list[PromptedPreference]]:
    dims: dict[str, list[PromptedPreference]] = {}
    for pref in prefs:
        dims.setdefault(pref.dimension, []).append(pref)
    return dims


def sample_combination(prefs_by_dimension: dict[str, list[PromptedPreference]],
                       rng: random.Random) -> list[PromptedPreference]:
    return [rng.choice(options) for options in prefs_by_dimension.values()]


def build_prompts(job: PolicyJob, tokenizer, records: list[dict]) -> dict[str, list]:
    """Columns of the RL dataset: prompt (what the policy sees), instruction (what RMs see), prefs."""
    fmt = job.model.prompt_format
    rng = random.Random(job.seed)
    dims = dimensions(job.prefs)
    columns: dict[str, list] = {"prompt": [], "instruction": [], "prefs": []}
    for row in records:
        combo = sample_combination(dims, rng) if job.mode == "morl" else []
        columns["prompt"].append(prompt_example(tokenizer, instruction_with_preferences(row["instruction"], combo),
                                                fmt))
        columns["instruction"].append(row["instruction"])
        columns["prefs"].append([p.id for p in combo])
    return columns


def multitask_examples(job: PolicyJob, tokenizer, pairs_by_pref: dict[str, list[dict]]) -> dict[str, list]:
    """SFT rows (TRL's prompt-completion format): each pair's instruction with its preference's prompt,
    and the response the judge chose for that preference."""
    fmt = job.model.prompt_format
    prefs = {p.id: p for p in job.prefs}
    columns: dict[str, list] = {"prompt": [], "completion": []}
    for pref_id, pairs in pairs_by_pref.items():
        for pair in pairs:
            columns["prompt"].append(prompt_example(
                tokenizer, instruction_with_preferences(pair["prompt"], [prefs[pref_id]]), fmt))
            columns["completion"].append(completion_example(tokenizer, pair["chosen"], fmt))
    return columns


def check_inputs(job: PolicyJob) -> tuple[dict, dict]:
    """Every input read and checked before any model loads: (data, counts for the summary)."""
    if job.annotations:
        loaded = {pref_id: load_pairs(path, alias) for pref_id, alias, path in job.annotations}
        pairs_by_pref = {pref_id: found for pref_id, (found, _) in loaded.items()}
        counts = {"pairs": sum(len(v) for v in pairs_by_pref.values()),
                  "pairs_skipped": sum(n for _, n in loaded.values())}
        if job.algo == "sft":
            counts["pairs_per_preference"] = {k: len(v) for k, v in pairs_by_pref.items()}
        return {"pairs": pairs_by_pref}, counts
    for _, alias, path in job.reward_models:
        require_reward_model(path, alias)
    records = job.prompts.load()
    return {"records": records}, {"prompts": len(records)}


def train_policy(job: PolicyJob, *, resume: bool = False, progress: ProgressFn | None = None,
                 force: bool = False) -> dict:
    """Train one LoRA policy; write job.out (adapter, tokenizer, metrics.jsonl, training.json) and
    return a summary. `resume` continues from the last checkpoint when there is one; a policy of the
    run directory is replaced only with `force`."""
    import datasets
    import trl

    out_dir = job.out
    ckpt_dir = staging_dir(out_dir, "checkpoints")
    last = last_complete_checkpoint(ckpt_dir) if resume else None
    if resume and not last and (out_dir / SUMMARY).is_file():
        # Finished before the interruption (e.g. the first policies of `--prefs all`): keep it.
        return {**json.loads((out_dir / SUMMARY).read_text()), "out_dir": str(out_dir), "already_done": True}

    data, data_counts = check_inputs(job)
    begin_outputs(job.record, [out_dir], force=force or bool(last), hint="pass --force to train it again, or --out")
    model_path = job.model.path()
    tokenizer = load_tokenizer(model_path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
    tokenizer.padding_side = "left"
    fmt = job.model.prompt_format

    defaults: dict = {"save_strategy": "steps", "save_total_limit": 2}
    if job.trainer.trainer.online:
        # A completion cut at max_completion_length is scored by the reward model as if it were a
        # finished answer (measured on the tiny run: a concise RM prefers the cut version of a long
        # answer in 36 of 40 cases); leave cut completions out of the policy loss.
        defaults["mask_truncated_completions"] = True
    fixed: dict = {}
    if job.save_steps:
        fixed.update(save_strategy="steps", save_steps=job.save_steps)
    if job.algo == "dpo":
        pairs = next(iter(data["pairs"].values()))
        dataset = datasets.Dataset.from_dict({
            "prompt": [prompt_example(tokenizer, p["prompt"], fmt) for p in pairs],
            "chosen": [completion_example(tokenizer, p["chosen"], fmt) for p in pairs],
            "rejected": [completion_example(tokenizer, p["rejected"], fmt) for p in pairs],
        })
        reward_kwargs: dict = {}
        funcs: list[RMReward] = []
    elif job.algo == "sft":
        dataset = datasets.Dataset.from_dict(multitask_examples(job, tokenizer, data["pairs"]))
        reward_kwargs, funcs = {}, []
    else:
        dataset = datasets.Dataset.from_dict(build_prompts(job, tokenizer, data["records"]))
        dtype = job.model.dtype_name()
        funcs = [RMReward(RewardScorer(path, dtype=dtype), pref_id, route=job.mode == "morl",
                          standardize=job.standardize_rewards)
                 for pref_id, _, path in job.reward_models]
        if job.mode == "morl" and job.trainer.get("reward_weights") is None:
            # nansum over the reward models that scored a sample, each weighted 1/dimensions: their mean.
            fixed["reward_weights"] = [1.0 / len(dimensions(job.prefs))] * len(funcs)
        reward_kwargs = {"reward_funcs": funcs}
    args = job.trainer.config(job.model, str(ckpt_dir), defaults=defaults, **fixed)

    rm_ids = [pref_id for pref_id, _, _ in job.reward_models or job.annotations]
    metrics_file = ckpt_dir / "metrics.jsonl"
    metrics_cb, progress_cb, interrupt_cb = make_callbacks(metrics_file, progress,
                                                           {f"rm_{rm_id}": rm_id for rm_id in rm_ids})
    if last:
        metrics_cb.truncate_after(_step_of(last))
    elif is_main_process() and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh start: old checkpoints would mix two runs

    trainer = getattr(trl, job.trainer.trainer.trainer)(
        model=model_path,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=job.lora.peft_config("CAUSAL_LM"),
        quantization_config=job.model.quantization_config(),
        callbacks=[cb for cb in (metrics_cb, progress_cb, interrupt_cb) if cb is not None],
        **reward_kwargs,
    )
    quiet_trainer(trainer)
    if job.algo == "sft" and len(trainer.train_dataset) == 0:  # TRL drops rows whose response is cut off entirely
        raise RecipeError(f"{job.trainer.origin}: train_policy.sft.max_length {args.max_length}: every prompt fills "
                          "it, no response token is left to learn from; raise it")
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
        raise TrainingInterrupted(f"training of policy '{job.name}' stopped at step {trainer.state.global_step}{saved}",
                                  resume=saving)

    records_logged = read_jsonl(metrics_file) if metrics_file.exists() else metrics_cb.records
    steps_run = trainer.state.global_step - (_step_of(last) if last else start_step)
    summary = {
        "name": job.name,
        "mode": job.mode,
        "algo": job.algo,
        "preferences": [] if job.mode == "rlhf" else rm_ids,
        "reward_models": {pref_id: str(path) for pref_id, _, path in job.reward_models},
        "base_model": model_path,
        "prompt_format": fmt,
        **({} if not job.trainer.trainer.online else {"max_completion_length": args.max_completion_length,
                                                       "mask_truncated_completions": args.mask_truncated_completions}),
        "steps": trainer.state.global_step,
        "resumed_from": _step_of(last) if last else None,
        "settings": record(job),
        **data_counts,
        "wall_s": round(wall, 3),
        "s_per_step": round(wall / max(1, steps_run), 4),
        **_trend(records_logged),
    }
    standardized = {f.pref_id: f.stats.to_record() for f in funcs if f.stats is not None}
    if standardized:
        # Per process and since the last (re)start: a resumed run begins its statistics afresh.
        summary["reward_standardization"] = standardized
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


def train_policies(jobs: Sequence[PolicyJob], *, resume: bool = False, progress_factory=None,
                   force: bool = False) -> dict[str, dict]:
    """Train several policies in turn; every input is checked first (no half-done 'all' because the
    fifth one is missing). Resumed, finished ones are kept and the others continue."""
    for job in jobs:
        check_inputs(job)
    if jobs and not resume:
        begin_outputs(jobs[0].record, [job.out for job in jobs], force=force,
                      hint="pass --force to train it again, or --out")
    return {job.name: train_policy(job, resume=resume, force=force,
                                   progress=progress_factory(job.name) if progress_factory else None)
            for job in jobs}
