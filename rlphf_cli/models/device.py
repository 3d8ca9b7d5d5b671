"""Trainer settings that depend on the device the models train on."""

from __future__ import annotations

from pathlib import Path


def device_defaults() -> dict[str, object]:
    """CPU: float32 (TRL defaults to bf16) and no activation checkpointing (slower on small models);
    `use_cpu` lets a recipe that asks for bf16 train in CPU bf16 autocast instead of failing with
    "Your setup doesn't support bf16/gpu". GPU: bf16 where supported, TRL's checkpointing default."""
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported()}
    return {"bf16": False, "use_cpu": True, "activation_checkpointing": False, "dataloader_pin_memory": False}


def bf16_is_fast() -> bool:
    """What a recipe's `bf16: auto` means: bf16 on a GPU that supports it and on a CPU with native
    bf16 (AVX512-BF16 or AMX); float32 elsewhere, where CPU bf16 autocast is emulated and slower
    (an AVX2-only CPU decoded Gemma 3 270M 1.8x slower in bf16 autocast than in float32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def bf16_is_emulated() -> bool:
    """Training on a CPU without native bf16, where `bf16: true` means slow emulated autocast."""
    import torch

    return not torch.cuda.is_available() and not cpu_has_fast_bf16()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is faster there (~1.5x on Gemma 3 270M); elsewhere slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
