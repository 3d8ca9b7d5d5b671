"""The GPU-hours estimate of `rlphf run --dry-run` follows its documented arithmetic."""

from __future__ import annotations

import pytest

from rlphf_cli.estimate import (
    A100_PEAK,
    DECODE_MFU,
    H100_PEAK,
    PROMPT_TOKENS,
    TRAIN_MFU,
    estimate_gpu_hours,
    parameter_count,
)
from rlphf_cli.recipe import load_recipe

HOUR = 3600


def test_paper_recipe_estimate_is_the_documented_arithmetic():
    estimate = estimate_gpu_hours(load_recipe("psoups-paper"))
    params = 7e9  # from the name allenai/tulu-2-7b (its config is not cached here)
    assert estimate["params"] == params
    sequence = PROMPT_TOKENS + 512
    train, decode = A100_PEAK * TRAIN_MFU, A100_PEAK * DECODE_MFU
    stages = estimate["stages"]
    # 10,000 prompts x 2 samples decoded
    assert stages["rollouts"] == pytest.approx(2 * params * 10_000 * 2 * sequence / decode / HOUR)
    # six reward models, 10,000 pairs x 2 sequences, one epoch
    assert stages["train-rm"] == pytest.approx(6 * 6 * params * 10_000 * 2 * sequence / train / HOUR)
    # six RLOO policies: 10,000 prompts x 4 completions x 3 epochs (TRL's default); train 6P + KL reference 2P
    # + one reward model 2P per token, and decoding 2P per token
    tokens = 10_000 * 4 * 3 * (PROMPT_TOKENS + 512)
    assert stages["train-policy"] == pytest.approx(6 * (10 * params * tokens / train + 2 * params * tokens / decode) / HOUR)
    # P-MORL: the same policy scored by one reward model per dimension (three)
    assert stages["baselines"] == pytest.approx((14 * params * tokens / train + 2 * params * tokens / decode) / HOUR)
    # 1 base + 8 combinations x (psoups, prompted, morl) + 6 experts + 5 sweep points, 50 prompts each
    assert stages["evaluate"] == pytest.approx(2 * params * 36 * 50 * sequence / decode / HOUR)
    assert estimate["total"] == pytest.approx(sum(stages.values()))
    assert estimate["total_h100"] == pytest.approx(estimate["total"] * A100_PEAK / H100_PEAK)


def test_parameters_come_from_a_local_config(tiny_random_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model)
    assert parameter_count(str(tiny_random_model)) == sum(p.numel() for p in model.parameters())
    assert parameter_count("org/model-1.5B") == 1.5e9 and parameter_count("org/unsized") is None


def test_no_estimate_for_the_embedded_tiny_model():
    assert estimate_gpu_hours(load_recipe("tiny")) is None
