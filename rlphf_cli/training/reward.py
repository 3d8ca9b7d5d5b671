"""LoRA reward models: TRL's RewardTrainer on AutoModelForSequenceClassification(num_labels=1).

`train_reward_model` trains one from an annotations file and writes rm/<id>/; `RewardScorer`
loads one (base + adapter) and scores (instruction, response) pairs with the RM's own tokenizer,
so reward models and policies need not share a tokenizer.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError, MissingArtifactError
from rlphf_cli.hub import require_model
from rlphf_cli.runs import begin_outputs
from rlphf_cli.specs import ModelSpec, RewardModelJob, record
from rlphf_cli.training import is_main_process
from rlphf_cli.training.callbacks import ProgressFn, make_callbacks
from rlphf_cli.training.common import (
    conversation_text,
    encode,
    load_pairs,
    load_tokenizer,
    publish,
    quiet_trainer,
    seqcls_load_quietly,
    staging_dir,
)

DEFAULT_MAX_LENGTH = 1024
RM_INFO = "metrics.json"


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded held-out split by prompt id, so no prompt is in both halves."""
    keys = list(dict.fromkeys(p["id"] for p in pairs))
    if len(keys) < 2:
        raise InputError(f"need pairs for at least 2 prompts to hold some out (got {len(keys)})")
    random.Random(seed).shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(eval_fraction * len(keys))))
    held_out = set(keys[:n_eval])
    return [p for p in pairs if p["id"] not in held_out], [p for p in pairs if p["id"] in held_out]


def train_reward_model(job: RewardModelJob, *, progress: ProgressFn | None = None, force: bool = False) -> dict:
    """Train the LoRA reward model of one preference (or 'general'); write `job.out` and return its
    metrics. A reward model of the run directory is replaced only with `force`."""
    from datasets import Dataset
    from trl import RewardTrainer

    pairs, skipped = load_pairs(job.data, job.alias)
    train_pairs, eval_pairs = split_pairs(pairs, job.eval_fraction, job.seed)
    begin_outputs(job.record, [job.out], force=force, hint="pass --force to train it again")

    model_path = job.model.path()
    tokenizer = load_tokenizer(model_path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
    fmt = job.model.prompt_format
    args = job.trainer.config(job.model, str(staging_dir(job.out, "trainer")))
    max_length = args.max_length or DEFAULT_MAX_LENGTH

    def tokenized(rows: list[dict]) -> dict[str, list]:
        return {
            "chosen_ids": [encode(tokenizer, conversation_text(tokenizer, r["prompt"], r["chosen"], fmt), fmt,
                                  max_length) for r in rows],
            "rejected_ids": [encode(tokenizer, conversation_text(tokenizer, r["prompt"], r["rejected"], fmt), fmt,
                                    max_length) for r in rows],
        }

    metrics_file = staging_dir(job.out, "metrics.jsonl")
    if is_main_process():  # rank 0 alone writes it
        metrics_file.unlink(missing_ok=True)
    metrics_cb, progress_cb, interrupt_cb = make_callbacks(metrics_file, progress)
    start = time.monotonic()
    trainer = RewardTrainer(
        model=model_path,
        args=args,
        train_dataset=Dataset.from_dict(tokenized(train_pairs)),
        processing_class=tokenizer,
        peft_config=job.lora.peft_config("SEQ_CLS"),
        quantization_config=job.model.quantization_config(),
        callbacks=[cb for cb in (metrics_cb, progress_cb, interrupt_cb) if cb is not None],
    )
    quiet_trainer(trainer)
    lora_dropout = restore_lora_dropout(trainer.model, job.lora.lora_dropout)
    try:
        result = trainer.train()
    finally:
        interrupt_cb.restore()
    if interrupt_cb.requested:
        raise KeyboardInterrupt
    train_s = time.monotonic() - start

    held = tokenized(eval_pairs)
    model_obj = trainer.accelerator.unwrap_model(trainer.model)
    chosen = score_ids(model_obj, tokenizer.pad_token_id, held["chosen_ids"])
    rejected = score_ids(model_obj, tokenizer.pad_token_id, held["rejected_ids"])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    metrics = {
        "preference": job.pref_id,
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "pairs_train": len(train_pairs),
        "pairs_eval": len(eval_pairs),
        "pairs_skipped": skipped,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_s": round(train_s, 3),
        "s_per_step": round(train_s / max(1, trainer.state.global_step), 4),
        "base_model": model_path,
        "prompt_format": fmt,
        "max_length": max_length,
        "lora_dropout": lora_dropout,
        "data": str(job.data),
        "settings": record(job),
    }
    publish(trainer, job.out, {RM_INFO: metrics}, copies={"metrics.jsonl": metrics_file})
    if is_main_process():
        metrics_file.unlink(missing_ok=True)
        shutil.rmtree(args.output_dir, ignore_errors=True)
    metrics["out_dir"] = str(job.out)
    return metrics


def restore_lora_dropout(model, p: float) -> float:
    """TRL's RewardConfig.disable_dropout (default true) sets every dropout to 0, the LoRA dropout
    the recipe asks for included. Keep the base model's dropout off (TRL's reason: a reward margin
    read through dropout is noisy) but give the LoRA layers their dropout back. Returns the LoRA
    dropout in effect."""
    import torch

    effective = []
    for name, module in model.named_modules():
        if ".lora_dropout." in f"{name}." and isinstance(module, torch.nn.Dropout):
            module.p = p
            effective.append(module.p)
    return max(effective, default=0.0)


def train_reward_models(jobs: Sequence[RewardModelJob], *, progress_factory=None, force: bool = False) -> dict[str, dict]:
    """Train several reward models in turn; every input is checked first (no half-done 'all'
    because the fifth one is missing). `progress_factory(id)` returns one model's progress callback."""
    for job in jobs:
        load_pairs(job.data, job.alias)
    if jobs:
        begin_outputs(jobs[0].record, [job.out for job in jobs], force=force, hint="pass --force to train it again")
    return {job.pref_id: train_reward_model(job, force=True,
                                            progress=progress_factory(job.pref_id) if progress_factory else None)
            for job in jobs}


# --------------------------------------------------------------------------------------------
# Scoring


def score_ids(model, pad_token_id: int, sequences: list[list[int]], batch_size: int = 16) -> list[float]:
    """The reward of each token sequence (read at its last token); batches of similar lengths."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = sequences[i]
                    ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, :len(seq)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
                for row, i in enumerate(idx):
                    scores[i] = float(logits[row])
    finally:
        model.train(was_training)
    return scores


def require_reward_model(rm_dir: str | Path, alias: str | None = None) -> Path:
    """The folder, or MissingArtifactError naming the command that makes it."""
    rm_dir = Path(rm_dir)
    if not (rm_dir / "adapter_config.json").is_file():
        alias = alias or rm_dir.name
        raise MissingArtifactError(f"reward model for {alias}", rm_dir, f"rlphf train-rm --prefs {alias}")
    return rm_dir


# Reward models on the same base share one copy of it (one PEFT adapter each): P-MORL scores with
# every preference's RM, and six copies of a 7B base would not fit next to the policy.
_SHARED: dict[tuple, object] = {}
_SHARED_LOCK = threading.Lock()


class RewardScorer:
    """Scores responses with a LoRA reward model folder (rm/<id>/), using the RM's own tokenizer."""

    def __init__(self, rm_dir: str | Path, *, device=None, dtype: str | None = None, batch_size: int = 16,
                 alias: str | None = None):
        import torch

        self.rm_dir = require_reward_model(rm_dir, alias)
        info_path = self.rm_dir / RM_INFO
        info = files.read_json_object(info_path, "reward model metrics") if info_path.is_file() else {}
        adapter_config = files.read_json_object(self.rm_dir / "adapter_config.json", "adapter config")
        self.base = adapter_config.get("base_model_name_or_path") or info.get("base_model")
        if not self.base:
            raise InputError(f"{self.rm_dir}: adapter_config.json does not name its base model")
        require_model(self.base)
        self.prompt_format = info.get("prompt_format", "chat")
        self.max_length = info.get("max_length", DEFAULT_MAX_LENGTH)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(str(self.rm_dir))
        if device is None:
            device = _default_device()
        if dtype is None:
            dtype = ModelSpec(self.base).dtype_name() if torch.device(device).type == "cuda" else "float32"
        self.name = "rm_" + "".join(c if c.isalnum() else "_" for c in self.rm_dir.name)
        # Named after the folder and its weights file, so a retrained RM is loaded again, not reused.
        weights = next(self.rm_dir.glob("adapter_model.*"), self.rm_dir / "adapter_config.json").stat()
        key = f"{self.rm_dir.resolve()}:{weights.st_mtime_ns}:{weights.st_size}"
        self._adapter = f"{self.name}_{zlib.crc32(key.encode()):08x}"
        self.model = self._load(torch.device(device), getattr(torch, dtype))

    def _load(self, device, dtype):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        key = (self.base, str(device), str(dtype))
        with _SHARED_LOCK:
            model = _SHARED.get(key)
            if model is None:
                with seqcls_load_quietly():
                    base = AutoModelForSequenceClassification.from_pretrained(self.base, num_labels=1, dtype=dtype)
                model = PeftModel.from_pretrained(base, str(self.rm_dir), adapter_name=self._adapter)
                model.to(device).eval()
                model.requires_grad_(False)
                _SHARED[key] = model
            elif self._adapter not in model.peft_config:
                model.load_adapter(str(self.rm_dir), adapter_name=self._adapter)
                model.to(device).eval()
                model.requires_grad_(False)
        self._lock = _SHARED_LOCK
        return model

    def texts(self, instructions: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [conversation_text(self.tokenizer, i, r, self.prompt_format) for i, r in zip(instructions, responses, strict=True)]

    def score(self, instructions: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One reward per (plain instruction, response) pair."""
        if len(instructions) != len(responses):
            raise InputError(f"{len(instructions)} instructions but {len(responses)} responses")
        sequences = [encode(self.tokenizer, t, self.prompt_format, self.max_length)
                     for t in self.texts(instructions, responses)]
        with self._lock:
            self.model.set_adapter(self._adapter)
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            return score_ids(self.model, self.tokenizer.pad_token_id, sequences, self.batch_size)


def _default_device():
    import torch

    if torch.cuda.is_available():
        try:
            from accelerate import PartialState

            return PartialState().device
        except Exception:  # noqa: BLE001 - any accelerate state problem: fall back to the current GPU
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def release_shared_models() -> None:
    """Drop the cached reward-model bases (tests, long-lived processes)."""
    with _SHARED_LOCK:
        _SHARED.clear()
