"""How an instruction and a set of preferences become the text a model is prompted with."""

from __future__ import annotations

from collections.abc import Iterable

from rlphf_cli.preferences import Preference, preference_prompt

TULU_TEMPLATE = "<|user|>\n{content}\n<|assistant|>\n"


def instruction_with_preferences(instruction: str, prefs: Iterable[Preference] = ()) -> str:
    """The paper appends the preference prompts to the instruction, separated by a space."""
    suffix = preference_prompt(prefs)
    return f"{instruction} {suffix}" if suffix else instruction


def render_prompt(tokenizer, content: str, prompt_format: str = "chat") -> str:
    """`chat`: the tokenizer's chat template (generation prompt added); `tulu`: the paper's format."""
    if prompt_format == "tulu" or getattr(tokenizer, "chat_template", None) is None:
        return TULU_TEMPLATE.format(content=content)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
