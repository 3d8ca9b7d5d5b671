"""LoRA adapters for tests, made with peft without training: random, non-zero factors (peft
initializes lora_B to 0, which would make every adapter and soup the base model)."""

from __future__ import annotations

import warnings
from pathlib import Path

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, r: int = 4, alpha: float = 8, seed: int = 0, std: float = 0.1,
                 targets: list[str] | str = TARGETS, task: str = "CAUSAL_LM",
                 randomize: tuple[str, ...] = ("lora_", "modules_to_save"), **extra) -> Path:
    """A LoRA adapter on a (Llama) base whose parameters named with any of `randomize` are drawn
    from N(0, std^2); the others keep peft's initialization."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    if task == "SEQ_CLS":
        model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    else:
        model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                        init_lora_weights=False, task_type=task, **extra)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if any(part in name for part in randomize):
            param.data = torch.randn(param.shape, generator=gen) * std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out)
    return out
