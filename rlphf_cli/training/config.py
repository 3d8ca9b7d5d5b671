"""TRL configs from a recipe's pass-through sections, with defaults that fit the device.

Precedence: device defaults < the recipe's trainer section < what the stage itself must fix
(output folder). Unknown keys are refused by `rlphf_cli.recipe.check_trainer_fields`.
"""

from __future__ import annotations

from typing import Any

from rlphf_cli.errors import InputError, RecipeError
from rlphf_cli.recipe import Recipe, check_trainer_fields

SECTIONS = {
    "RewardConfig": ("train_rm", "trl"),
    "RLOOConfig": ("train_policy", "rloo"),
    "GRPOConfig": ("train_policy", "grpo"),
    "DPOConfig": ("train_policy", "dpo"),
    "SFTConfig": ("train_policy", "sft"),
}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def model_dtype(recipe: Recipe) -> str:
    """recipe.model.dtype; 'auto' is bfloat16 on a GPU that has it, float32 otherwise (CPU)."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    import torch

    return "bfloat16" if on_gpu() and torch.cuda.is_bf16_supported() else "float32"


def device_defaults() -> dict[str, Any]:
    """CPU: float32 (TRL defaults to bf16) and no activation checkpointing (slower on small models);
    `use_cpu` lets a recipe that asks for bf16 train in CPU bf16 autocast instead of failing with
    "Your setup doesn't support bf16/gpu". GPU: bf16 where supported, TRL's checkpointing default."""
    if on_gpu():
        import torch

        return {"bf16": torch.cuda.is_bf16_supported()}
    return {"bf16": False, "use_cpu": True, "activation_checkpointing": False, "dataloader_pin_memory": False}


def quantization_config(recipe: Recipe):
    """A 4-bit (QLoRA) BitsAndBytesConfig when recipe.model.load_in_4bit, else None."""
    if not recipe.model.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError("model.load_in_4bit needs bitsandbytes: pip install 'rlphf[quant]'") from None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def trainer_config(recipe: Recipe, class_name: str, output_dir: str, defaults: dict[str, Any] | None = None,
                   **fixed: Any):
    """Build trl.<class_name>: device defaults < `defaults` < the recipe's section < `fixed`."""
    import trl

    check_trainer_fields(recipe)
    section, sub = SECTIONS[class_name]
    user = dict(getattr(getattr(recipe, section), sub))
    kwargs: dict[str, Any] = {
        "seed": recipe.seed,
        "report_to": "none",
        "logging_steps": 1,  # metrics.jsonl has one line per step
        "disable_tqdm": True,  # the CLI draws its own progress bar
        "save_strategy": "no",
        "model_init_kwargs": {"dtype": model_dtype(recipe), "revision": recipe.model.revision},
        "trust_remote_code": recipe.model.trust_remote_code,
        **device_defaults(),
        **(defaults or {}),
    }
    if "gradient_checkpointing" in user:  # the deprecated alias only counts when the new name is unset
        kwargs.pop("activation_checkpointing", None)
    user = _coerce_numbers(getattr(trl, class_name), user, recipe, f"{section}.{sub}")
    if "save_steps" in user and "save_strategy" not in user:
        kwargs["save_strategy"] = "steps"
    kwargs.update(user)
    kwargs.update(fixed)
    kwargs["output_dir"] = output_dir
    try:
        return getattr(trl, class_name)(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{recipe.source}: {section}.{sub}: {exc}") from None


def _coerce_numbers(config_class, values: dict[str, Any], recipe: Recipe, where: str) -> dict[str, Any]:
    """YAML reads `5e-4` (no dot) as a string: turn strings into numbers for numeric-only fields."""
    import dataclasses

    types = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
    out = dict(values)
    for key, value in values.items():
        kind = types.get(key, "")
        if not isinstance(value, str) or "str" in kind or not ("float" in kind or "int" in kind):
            continue
        try:
            out[key] = int(value) if "float" not in kind else float(value)
        except ValueError:
            raise RecipeError(f"{recipe.origin(f'{where}.{key}')}: {where}.{key}: expected a number, got {value!r}") from None
    return out
