"""Prompting (rlphf_cli.prompting): one rule for prompt -> token ids. Generation, TRL's RL prompts and the
reward model's inputs see the same ids, BOS included, for a model whose tokenizer has a BOS token (the
tiny models have none, so only this fixture shows a difference)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import generator_for

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
    from trl import RLOOTrainer

    from rlphf_cli.jobs import policy_jobs
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training.common import conversation_text, encode, load_tokenizer
    from rlphf_cli.training.policy import build_prompts

    recipe = load_recipe(None, [f"model.name={bos_model}", f"model.prompt_format={prompt_format}"])
    instruction = "Explain gravity."
    prefs = recipe.preference_set().resolve("P2A")

    generator = generator_for(recipe)
    generated = generator.prompt_ids(generator.prompt_text(instruction, prefs))

    tokenizer = load_tokenizer(str(bos_model))
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos and tokenizer("x", add_special_tokens=False)["input_ids"][0] != bos
    # The RL dataset as train-policy builds it (mode morl appends preference prompts), tokenized by TRL's own code.
    columns = build_prompts(policy_jobs(recipe, mode="morl")[0], tokenizer, [{"instruction": instruction}])
    trl_self = SimpleNamespace(processing_class=tokenizer, chat_template_kwargs={}, _is_vlm=False)
    rl_ids = RLOOTrainer._tokenize_prompts(trl_self, columns["prompt"])[0][0]
    plain = build_prompts(policy_jobs(recipe, "P2A")[0], tokenizer, [{"instruction": instruction}])["prompt"]
    assert rl_ids[0] == bos and rl_ids.count(bos) == 1
    assert RLOOTrainer._tokenize_prompts(trl_self, plain)[0][0] == generator.prompt_ids(generator.prompt_text(instruction))
    assert generated[0] == bos and generated.count(bos) == 1

    # The reward model reads prompt + response: the same prompt ids come first.
    text = conversation_text(tokenizer, instruction, "Gravity pulls things.", prompt_format)
    scored = encode(tokenizer, text, prompt_format, None)
    plain = generator.prompt_ids(generator.prompt_text(instruction))
    assert scored[:len(plain)] == plain and scored.count(bos) == 1
