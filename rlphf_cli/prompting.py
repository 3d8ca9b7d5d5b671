"""How an instruction and a set of preferences become the text, and then the token ids, a model
is prompted with. Every place that turns a prompt into ids (generation, RL prompts, reward-model
inputs, serving, the hf judge) goes through `text_ids`, so they all see the same ids."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rlphf_cli.preferences import Preference, preference_prompt

TULU_TEMPLATE = "<|user|>\n{content}\n<|assistant|>\n"


def instruction_with_preferences(instruction: str, prefs: Iterable[Preference] = ()) -> str:
    """The paper appends the preference prompts to the instruction, separated by a space."""
    suffix = preference_prompt(prefs)
    return f"{instruction} {suffix}" if suffix else instruction


def messages_with_preferences(messages: Sequence[Mapping[str, str]],
                              prefs: Iterable[Preference] = ()) -> list[dict[str, str]]:
    """A conversation with the preference prompts appended to its last user message, the way
    `instruction_with_preferences` does to a single instruction."""
    out = [dict(m) for m in messages]
    last_user = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
    if last_user is not None:
        out[last_user]["content"] = instruction_with_preferences(out[last_user]["content"], prefs)
    return out


def uses_chat_template(tokenizer, prompt_format: str = "chat") -> bool:
    """'chat' with a tokenizer that has a chat template; anything else is the paper's Tulu format."""
    return prompt_format != "tulu" and getattr(tokenizer, "chat_template", None) is not None


def render_prompt(tokenizer, content: str, prompt_format: str = "chat") -> str:
    """`chat`: the tokenizer's chat template (generation prompt added); `tulu`: the paper's format."""
    return render_messages(tokenizer, [{"role": "user", "content": content}], prompt_format)


def render_messages(tokenizer, messages: Sequence[Mapping[str, str]], prompt_format: str = "chat") -> str:
    """A conversation (role/content dicts) as prompt text: `chat` applies the tokenizer's chat
    template to the whole list (generation prompt added); `tulu` writes each turn as
    '<|role|>\\n{content}\\n' (an assistant turn ends with EOS, as open-instruct's Tulu format does)
    and ends with '<|assistant|>\\n'. One user message is render_prompt's text."""
    if uses_chat_template(tokenizer, prompt_format):
        return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
    eos = getattr(tokenizer, "eos_token", None) or ""
    turns = [f"<|{m['role']}|>\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


def text_ids(tokenizer, text: str, prompt_format: str = "chat") -> list[int]:
    """Token ids of text rendered by `render_prompt` (or a prompt plus its response).

    A chat template writes its own special tokens (a BOS where the model's template has one), so
    nothing is added; a Tulu string gets the tokenizer's special tokens (BOS). This is what TRL's
    RL trainers do with conversational and plain prompts, and what the paper's generate_rollouts.py
    did (`tokenizer(prompt)`).
    """
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, prompt_format))["input_ids"]
