"""How an instruction and a set of preferences become the text, and then the token ids, a model
is prompted with. Every place that turns a prompt into ids (generation, RL prompts, reward-model
inputs, serving, the hf judge) goes through `text_ids`, so they all see the same ids."""

from __future__ import annotations

from collections.abc import Iterable

from rlphf_cli.preferences import Preference, preference_prompt

TULU_TEMPLATE = "<|user|>\n{content}\n<|assistant|>\n"


def instruction_with_preferences(instruction: str, prefs: Iterable[Preference] = ()) -> str:
    """The paper appends the preference prompts to the instruction, separated by a space."""
    suffix = preference_prompt(prefs)
    return f"{instruction} {suffix}" if suffix else instruction


def uses_chat_template(tokenizer, prompt_format: str = "chat") -> bool:
    """'chat' with a tokenizer that has a chat template; anything else is the paper's Tulu format."""
    return prompt_format != "tulu" and getattr(tokenizer, "chat_template", None) is not None


def render_prompt(tokenizer, content: str, prompt_format: str = "chat") -> str:
    """`chat`: the tokenizer's chat template (generation prompt added); `tulu`: the paper's format."""
    if not uses_chat_template(tokenizer, prompt_format):
        return TULU_TEMPLATE.format(content=content)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def text_ids(tokenizer, text: str, prompt_format: str = "chat") -> list[int]:
    """Token ids of text rendered by `render_prompt` (or a prompt plus its response).

    A chat template writes its own special tokens (a BOS where the model's template has one), so
    nothing is added; a Tulu string gets the tokenizer's special tokens (BOS). This is what TRL's
    RL trainers do with conversational and plain prompts, and what the paper's generate_rollouts.py
    did (`tokenizer(prompt)`).
    """
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, prompt_format))["input_ids"]
