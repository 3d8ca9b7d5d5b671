"""A short instruction-tuning stage for a base model that does not end its answers.

The paper began from Tulu, an instruction-tuned model. A pretrained base model (Gemma 3 270M) given
the Tulu format writes plausible English but never stops: every RL completion is cut at the length
limit, so length preferences have nothing to learn from. So a base model is first tuned with LoRA on
the instruction set the project ships (the tiny model's corpus: answers of one to three sentences in
random registers and tones, each ending with the tokenizer's EOS, plus a minority that carry the
paper's preference prompts), the adapter is merged into the weights and the result is saved as an
ordinary model folder, cached under $RLPHF_HOME like every built-in model. What it teaches is the
format and where an answer ends; the styles stay random, so RL still has winners and losers to
separate.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlphf_cli.models.cache import BUILD_INFO, ensure_built, read_build_info, rlphf_home

SFT_VERSION = 1
SFT_CONFIG: dict[str, Any] = {
    "prompt_format": "tulu",
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
    "learning_rate": 2.0e-4,
    "batch_size": 8,
    "max_steps": 40,
    "max_length": 160,
    "warmup_steps": 4,
    "seed": 0,
}


def sft_fingerprint(base: Path, settings: dict) -> str:
    """What the tuned weights depend on: the base model's build, the corpus bytes and the settings."""
    from rlphf_cli.models.tiny import corpus_files

    digest = hashlib.sha256()
    base_info = read_build_info(base)
    digest.update(json.dumps({"base": base_info.get("source_sha256") or base_info.get("fingerprint")
                              or base_info.get("weights_sha256"), "version": SFT_VERSION, "settings": settings},
                             sort_keys=True).encode())
    for path in corpus_files():
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_sft_model(base: Path, name: str, *, force: bool = False,
                     progress: Callable[[int, int], None] | None = None, **overrides: Any) -> Path:
    """The tuned copy of the model folder `base`, built first if missing. `overrides` (SFT_CONFIG
    keys) exist for fast tests."""
    unknown = set(overrides) - set(SFT_CONFIG)
    if unknown:
        raise ValueError(f"unknown SFT settings: {sorted(unknown)}")
    settings = {**SFT_CONFIG, **overrides}
    target = rlphf_home() / "models" / f"{name}-{sft_fingerprint(base, settings)[:12]}"
    return ensure_built(target, lambda: build_sft_model(base, target, settings, progress), force)


def sft_examples(tokenizer, settings: dict) -> list[dict]:
    """Prompt-completion examples tokenized the way generation, the reward model and RL tokenize
    prompts (`text_ids`: BOS first where the tokenizer adds one), the completion ending with EOS."""
    from rlphf_cli.data import load_prompts
    from rlphf_cli.models.corpus import build_sft_examples, load_topics
    from rlphf_cli.prompting import render_prompt, text_ids

    prompts = [{"prompt": r["instruction"], "topic": r["topic"]} for r in load_prompts("builtin:tiny-train")]
    examples = build_sft_examples(load_topics(), prompts, seed=settings["seed"])
    needed = settings["max_steps"] * settings["batch_size"]
    rows = []
    for example in examples:
        prompt_ids = text_ids(tokenizer, render_prompt(tokenizer, example["instruction"], settings["prompt_format"]),
                              settings["prompt_format"])
        completion_ids = tokenizer(example["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(completion_ids) > settings["max_length"]:
            continue  # cut, it would teach the model not to end
        rows.append({"input_ids": prompt_ids + completion_ids,
                     "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)})
        if len(rows) == needed:
            break
    return rows


def build_sft_model(base: Path, out: Path, settings: dict,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, Trainer
    from trl import SFTConfig, SFTTrainer

    from rlphf_cli.models.device import bf16_is_fast, device_defaults
    from rlphf_cli.runs import atomic_dir
    from rlphf_cli.training.callbacks import loss_tracker
    from rlphf_cli.training.common import load_tokenizer, quiet_trainer

    class _PlainLossSFTTrainer(SFTTrainer):
        """The model's own cross-entropy: TRL's entropy/accuracy metrics would compute a second
        softmax over the whole (262k-token) vocabulary every step."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    start = time.time()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(str(base))
    rows = sft_examples(tokenizer, settings)
    random.Random(f"sft-order-{settings['seed']}").shuffle(rows)
    torch.manual_seed(settings["seed"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    track, losses = loss_tracker(progress)

    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="rlphf-sft-") as trainer_dir:
        args = SFTConfig(
            output_dir=trainer_dir, max_steps=settings["max_steps"], per_device_train_batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"], lr_scheduler_type="cosine", warmup_steps=settings["warmup_steps"],
            max_length=settings["max_length"], logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, completion_only_loss=True, seed=settings["seed"], data_seed=settings["seed"],
            optim="adamw_torch", dataloader_num_workers=0,
            **{**device_defaults(), "bf16": bf16_is_fast()},  # CPU bf16 autocast only where it is native
        )
        lora = LoraConfig(**settings["lora"], target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = _PlainLossSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                       processing_class=tokenizer, peft_config=lora, callbacks=[track])
        quiet_trainer(trainer)
        result = trainer.train()
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        base_info = read_build_info(base)
        info = {
            "base": str(base), "base_source_sha256": base_info.get("source_sha256"),
            "architecture": base_info.get("architecture"), "settings": settings, "bf16_autocast": bool(args.bf16),
            "steps": trainer.state.global_step, "examples": len(rows),
            "first_loss": round(losses[0], 4) if losses else None, "final_loss": round(losses[-1], 4) if losses else None,
            "train_loss": round(float(result.training_loss), 4), "build_seconds": round(time.time() - start, 1),
            "version": SFT_VERSION,
        }
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info

