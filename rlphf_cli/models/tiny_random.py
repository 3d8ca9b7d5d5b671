"""`tiny-random`: a small Llama with random weights, for smoke runs (`rlphf run smoke`, `--smoke`).

It checks that the machinery runs, never what a run learns: its answers are random tokens. It has
the embedded model's kind of tokenizer (an offline byte-level BPE with the same special tokens and
chat template), fitted on the shipped prompts and topics, and seeded weights; nothing is trained,
so a build takes about a second. Cached under rlphf_home() by a hash of its settings, like `tiny`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rlphf_cli.models.cache import BUILD_INFO, ensure_built, rlphf_home
from rlphf_cli.models.corpus import DATA_DIR, TOPICS_FILE

BUILDER_VERSION = 1
NAME = "tiny-random"

# As small as a Llama gets with grouped-query attention and a chat vocabulary: decoding and LoRA
# steps cost next to nothing, so a smoke run's time is the pipeline's own overhead.
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    # 10x the usual init: with 0.02 the logits are so flat that the seeded samples ignore the prompt
    # (prompted and plain answers came out identical, every judgment a tie).
    "initializer_range": 0.2,
}
TOKENIZER_SOURCES = (TOPICS_FILE, DATA_DIR / "tiny-train.jsonl")


def build_fingerprint(seed: int = 0) -> str:
    digest = hashlib.sha256()
    for path in TOKENIZER_SOURCES:
        digest.update(path.read_bytes())
    settings = {"version": BUILDER_VERSION, "model": MODEL_CONFIG, "seed": seed}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def tiny_random_dir(seed: int = 0) -> Path:
    return rlphf_home() / f"{NAME}-{build_fingerprint(seed)[:12]}"


def ensure_tiny_random_model(force: bool = False, seed: int = 0) -> Path:
    """The cached folder, built first if missing (or if `force`)."""
    target = tiny_random_dir(seed)
    return ensure_built(target, lambda: build_tiny_random_model(target, seed=seed), force)


def _tokenizer_texts() -> list[str]:
    from rlphf_cli.preferences import CATALOG

    texts = [line for line in TOPICS_FILE.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    texts += [json.loads(line)["prompt"] for line in (DATA_DIR / "tiny-train.jsonl").read_text().splitlines()
              if line.strip()]
    return texts + [p.prompt for p in CATALOG]


def build_tiny_random_model(out: str | Path, seed: int = 0) -> dict:
    """Build into `out` (published atomically) and return the build info."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlphf_cli.models.tokenizer import build_tokenizer
    from rlphf_cli.runs import atomic_dir, file_sha256

    start = time.time()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" for 140 kB
    out = Path(out)
    with atomic_dir(out) as tmp:
        tokenizer = build_tokenizer(_tokenizer_texts(), vocab_size=MODEL_CONFIG["vocab_size"])
        config = LlamaConfig(
            **{**MODEL_CONFIG, "vocab_size": len(tokenizer)},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )
        with torch.random.fork_rng():  # seeded weights without moving the caller's random state
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "name": NAME,
            "params": sum(p.numel() for p in model.parameters()),
            "random_weights": True,
            "seed": seed,
            "model": MODEL_CONFIG,
            "builder_version": BUILDER_VERSION,
            "fingerprint": build_fingerprint(seed),
            "weights_sha256": file_sha256(tmp / "model.safetensors"),
            "build_seconds": round(time.time() - start, 2),
        }
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "path": str(out)}
