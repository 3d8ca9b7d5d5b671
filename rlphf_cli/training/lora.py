"""LoRA settings from a recipe's `lora` section."""

from __future__ import annotations

from rlphf_cli.recipe import LoraSection


def lora_config(section: LoraSection, task_type: str):
    """A peft LoraConfig. `SEQ_CLS` (reward models) also trains and saves the `score` head."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=section.target_modules,
        bias=section.bias,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
