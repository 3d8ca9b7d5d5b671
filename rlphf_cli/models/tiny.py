"""The embedded tiny model: an offline BPE tokenizer and a small LlamaForCausalLM, SFT'd with TRL on
the shipped corpus (rlphf_cli/models/corpus.py). Built on first use and cached under rlphf_home().

The cache folder's name carries a hash of the corpus, the builder's settings and the seed, so a
changed builder builds a new model instead of reusing a stale one. Builds go to a temporary
folder renamed into place, under a file lock, so concurrent processes never see half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlphf_cli.models.cache import BUILD_INFO, ensure_built, is_built, read_build_info, rlphf_home  # noqa: F401
from rlphf_cli.models.corpus import DATA_DIR, TOPICS_FILE, build_sft_examples, load_topics

BUILDER_VERSION = 1

# Hidden 128, 4 layers, 680 steps: 95% of answers sampled at T=1 on the held-out prompts are on
# topic (544 steps 88%, 435 steps 10%).
# Sample efficiency decides: a narrow model, tied embeddings (copying the prompt's topic is easy
# when input and output embeddings are one matrix), and the highest learning rate that is stable
# (6e-3 fails).
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 3072,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
TRAIN_CONFIG: dict[str, Any] = {
    "plain_per_prompt": 4,
    "prompted_per_prompt": 1,  # 20% of the examples carry preference prompts
    "follow_rate": 0.75,
    "epochs": 5,  # repeated passes: the facts are memorized around the third one
    "batch_size": 16,
    "learning_rate": 4e-3,
    "warmup_steps": 0.03,
    "max_length": 192,
}


def corpus_files() -> list[Path]:
    return [TOPICS_FILE, DATA_DIR / "tiny-train.jsonl"]


def build_fingerprint(seed: int = 0, **overrides: Any) -> str:
    """What the built weights depend on: corpus bytes, settings, builder version and seed."""
    digest = hashlib.sha256()
    for path in corpus_files():
        digest.update(path.read_bytes())
    settings = {"version": BUILDER_VERSION, "model": MODEL_CONFIG, "train": TRAIN_CONFIG, "seed": seed,
                "overrides": overrides}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def tiny_model_dir(seed: int = 0) -> Path:
    return rlphf_home() / f"tiny-{build_fingerprint(seed)[:12]}"


def ensure_tiny_model(force: bool = False, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Path:
    """The cached embedded model folder, built first if missing (or if `force`)."""
    target = tiny_model_dir(seed)
    return ensure_built(target, lambda: build_tiny_model(target, seed=seed, progress=progress), force)


def build_tiny_model(
    out: str | os.PathLike,
    seed: int = 0,
    *,
    max_steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> dict:
    """Build the tiny model into `out` (replaced atomically) and return its build info.

    `max_steps` and `overrides` (MODEL_CONFIG / TRAIN_CONFIG keys) exist for fast tests; the
    cached model always uses the defaults. `progress(step, total)` is called after each step.
    """
    from rlphf_cli.runs import atomic_dir

    out = Path(out)
    with atomic_dir(out) as tmp:
        info = _build(tmp, seed, max_steps, progress, overrides)
        info["fingerprint"] = build_fingerprint(seed, **overrides, **({"max_steps": max_steps} if max_steps else {}))
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    info["path"] = str(out)
    return info


def _build(out: Path, seed: int, max_steps: int | None, progress, overrides: dict) -> dict:
    import datasets
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer
    from trl import SFTConfig, SFTTrainer

    class _PlainLossSFTTrainer(SFTTrainer):
        """The model's own cross-entropy: on a CPU tiny model TRL's fused log-prob path and its
        entropy/accuracy metrics cost about half of every step."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    from rlphf_cli.data import load_prompts
    from rlphf_cli.models.tokenizer import build_tokenizer
    from rlphf_cli.runs import file_sha256
    from rlphf_cli.training.callbacks import loss_tracker
    from rlphf_cli.training.common import quiet_trainer

    unknown = set(overrides) - set(MODEL_CONFIG) - set(TRAIN_CONFIG)
    if unknown:
        raise ValueError(f"unknown tiny model settings: {sorted(unknown)}")
    model_cfg = {**MODEL_CONFIG, **{k: v for k, v in overrides.items() if k in MODEL_CONFIG}}
    train_cfg = {**TRAIN_CONFIG, **{k: v for k, v in overrides.items() if k in TRAIN_CONFIG}}
    start = time.time()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    topics = load_topics()
    prompts = [{"prompt": r["instruction"], "topic": r["topic"]} for r in load_prompts("builtin:tiny-train")]
    examples = build_sft_examples(
        topics, prompts, seed=seed, plain_per_prompt=train_cfg["plain_per_prompt"],
        prompted_per_prompt=train_cfg["prompted_per_prompt"], follow_rate=train_cfg["follow_rate"],
    )
    texts = [text for e in examples for text in (e["instruction"], e["response"])]
    tokenizer = build_tokenizer(texts, vocab_size=model_cfg["vocab_size"])
    rng = random.Random(f"order-{seed}")
    examples_in_order = [example for _ in range(train_cfg["epochs"])
                         for batch in _length_grouped_batches(examples, train_cfg["batch_size"], rng)
                         for example in batch]

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**model_cfg, "vocab_size": len(tokenizer)},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None

    dataset = _tokenized_dataset(tokenizer, examples_in_order)
    track, losses = loss_tracker(progress)

    threads = torch.get_num_threads()
    torch.set_num_threads(_build_threads())
    with contextlib.ExitStack() as restore, tempfile.TemporaryDirectory(prefix="rlphf-tiny-trainer-") as trainer_dir:
        restore.callback(torch.set_num_threads, threads)
        args = SFTConfig(
            output_dir=trainer_dir,
            num_train_epochs=1,  # the epochs are laid out in the dataset
            max_steps=max_steps or -1,
            per_device_train_batch_size=train_cfg["batch_size"],
            learning_rate=train_cfg["learning_rate"],
            lr_scheduler_type="cosine",
            warmup_steps=train_cfg["warmup_steps"],
            weight_decay=0.0,
            max_length=train_cfg["max_length"],
            train_sampling_strategy="sequential",  # shuffled and length-grouped above, per epoch
            logging_steps=10,
            logging_first_step=True,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            bf16=False,
            fp16=False,
            use_cpu=True,  # tiny: a GPU brings nothing, and CPU keeps the weights reproducible
            activation_checkpointing=False,
            optim="adamw_torch",
            completion_only_loss=True,
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
        )
        trainer = _PlainLossSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                       callbacks=[track])
        quiet_trainer(trainer)
        result = trainer.train()
        steps = trainer.state.global_step

    model = trainer.model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    weights = out / "model.safetensors"
    return {
        "params": params,
        "size_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 2),
        "final_loss": round(losses[-1], 4) if losses else None,
        "train_loss": round(float(result.training_loss), 4),
        "steps": steps,
        "examples": len(examples_in_order),
        "build_seconds": round(time.time() - start, 1),
        "seed": seed,
        "weights_sha256": file_sha256(weights),
        "model": model_cfg,
        "train": train_cfg,
        "builder_version": BUILDER_VERSION,
    }


def _tokenized_dataset(tokenizer, examples: list[dict]):
    """Prompt-completion examples, tokenized up front (TRL's per-example chat-template rendering
    costs seconds we do not have): prompt = the chat template with the generation prompt,
    completion = response + end token, so the loss falls on the completion only."""
    import datasets

    from rlphf_cli.prompting import render_prompt

    prompts = [render_prompt(tokenizer, e["instruction"]) for e in examples]
    completions = [e["response"] + tokenizer.eos_token for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    first = tokenizer.apply_chat_template(
        [{"role": "user", "content": examples[0]["instruction"]},
         {"role": "assistant", "content": examples[0]["response"]}], tokenize=False)
    if not first.startswith(prompts[0] + completions[0]):  # the template and this shortcut must agree
        raise RuntimeError("tiny model: chat template and pre-tokenized examples disagree")
    return datasets.Dataset.from_dict({
        "input_ids": [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)],
        "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)],
    })


def _length_grouped_batches(examples: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """One shuffled pass over `examples` as batches of similar lengths (less padding), in random order."""
    order = examples[:]
    rng.shuffle(order)
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window],
                       key=lambda e: len(e["instruction"]) + len(e["response"]))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _build_threads() -> int:
    """Every core unless OMP_NUM_THREADS says otherwise, whatever the caller set for itself (tests and
    merges run with one thread): two threads make a step 1.6x faster on 2 idle cores (159 s build
    instead of 252 s). Float sums split across threads round differently, so the weights hash is
    reproducible for a given seed and core count."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
