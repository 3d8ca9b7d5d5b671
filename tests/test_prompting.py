"""Prompting (rlphf_cli.prompting): one rule for prompt -> token ids. Generation, TRL's RL prompts and the
reward model's inputs see the same ids, BOS included, for a model whose tokenizer has a BOS token (the
tiny models have none, so only this fixture shows a difference)."""

from __future__ import annotations

import pytest
from helpers import assert_prompt_ids_shared

from tests.conftest import FIXTURE_TEXTS

BOS = "<s>"


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """A random Llama whose tokenizer adds a BOS (like Llama/Tulu) and whose chat template writes it."""
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlphf_cli.models.tokenizer import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(FIXTURE_TEXTS, vocab_size=320)
    tokenizer.add_special_tokens({"bos_token": BOS})
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=bos_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bos-model")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("prompt_format", ["tulu", "chat"])
def test_generation_rl_prompts_and_reward_inputs_share_ids(bos_model, prompt_format):
    assert_prompt_ids_shared(bos_model, prompt_format)
