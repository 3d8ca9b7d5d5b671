"""What reward and policy training share: tokenizers, prompt formats, annotations, publishing."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError, MissingArtifactError
from rlphf_cli.prompting import TULU_TEMPLATE, text_ids, uses_chat_template
from rlphf_cli.runs import atomic_dir, atomic_write_json, atomic_write_text, fs_errors
from rlphf_cli.training import is_main_process

# Files Trainer.save_model writes that a published folder does not need (a pickle of the config).
SKIPPED_FILES = {"training_args.bin"}


def quiet_trainer(trainer) -> None:
    """With tqdm off, Trainer prints every log dict; our callbacks report progress and metrics instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def seqcls_load_quietly():
    """Loading a causal LM checkpoint as a sequence classifier prints a missing/unexpected keys table
    (the fresh score head, the unused lm_head); TRL has a context manager that silences it."""
    import contextlib

    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:
        return contextlib.nullcontext()
    return suppress_seqcls_warning()


def load_tokenizer(model_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub name, with a pad token (EOS where it has none)."""
    from transformers import AutoTokenizer

    from rlphf_cli.hub import require_model

    require_model(model_path, revision)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_example(tokenizer, content: str, prompt_format: str):
    """A TRL prompt: conversational messages (TRL applies the chat template) or a Tulu string."""
    if uses_chat_template(tokenizer, prompt_format):
        return [{"role": "user", "content": content}]
    return TULU_TEMPLATE.format(content=content)


def completion_example(tokenizer, text: str, prompt_format: str):
    if uses_chat_template(tokenizer, prompt_format):
        return [{"role": "assistant", "content": text}]
    return text + (tokenizer.eos_token or "")


def completion_text(completion) -> str:
    """A TRL completion (string, or a list of messages for conversational data) as plain text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def conversation_text(tokenizer, instruction: str, response: str, prompt_format: str) -> str:
    """The full text a reward model reads: prompt + response + end of turn."""
    if uses_chat_template(tokenizer, prompt_format):
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return TULU_TEMPLATE.format(content=instruction) + response + (tokenizer.eos_token or "")


def encode(tokenizer, text: str, prompt_format: str, max_length: int | None) -> list[int]:
    """Token ids by the one rule of rlphf_cli.prompting.text_ids. Too long: keep the end, where the
    reward is read."""
    ids = text_ids(tokenizer, text, prompt_format)
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


# --------------------------------------------------------------------------------------------
# Annotations


def _pair_problem(row: dict) -> str | None:
    if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
        return "a preference pair needs 'prompt', 'chosen' and 'rejected' strings (TRL's preference format)"
    return None


def load_pairs(path: Path, annotate_alias: str) -> tuple[list[dict], int]:
    """Usable preference pairs from an annotations JSONL, and how many were skipped.

    A pair is usable when prompt, chosen and rejected are non-empty and chosen != rejected.
    """
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(f"annotations for {annotate_alias}", path,
                                   f"rlphf annotate --prefs {annotate_alias}")
    pairs, skipped = [], 0
    for row in files.read_jsonl(path, "preference pair", check=_pair_problem):
        fields = [row[k] for k in ("prompt", "chosen", "rejected")]
        if not all(f.strip() for f in fields) or fields[1] == fields[2]:
            skipped += 1
            continue
        pairs.append({"prompt": fields[0], "chosen": fields[1], "rejected": fields[2],
                      "id": str(row.get("id", fields[0]))})
    if not pairs:
        raise InputError(f"{path}: no usable preference pairs ({skipped} skipped; each needs non-empty "
                         "'prompt', 'chosen' and 'rejected' with chosen != rejected)")
    return pairs, skipped


# --------------------------------------------------------------------------------------------
# Publishing


def staging_dir(out_dir: Path, kind: str) -> Path:
    """A fixed sibling of `out_dir` (the same on every process of a distributed launch)."""
    return out_dir.parent / f".{out_dir.name}.{kind}"


def publish(trainer, out_dir: Path, files: dict[str, object], copies: dict[str, Path] | None = None) -> None:
    """Save the trained adapter and tokenizer, add `files` (name -> dict for JSON or str) and `copies`
    (name -> existing file), then replace `out_dir` in one rename. Every process must call this (DeepSpeed
    gathers weights collectively); only the main one writes."""
    stage = staging_dir(out_dir, "saving")
    with fs_errors(out_dir):
        trainer.save_model(str(stage))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        with atomic_dir(out_dir) as tmp:
            for item in stage.iterdir():
                if item.name not in SKIPPED_FILES and item.is_file():
                    shutil.copy2(item, tmp / item.name)
            for name, source in (copies or {}).items():
                if Path(source).is_file():
                    shutil.copy2(source, tmp / name)
            for name, content in files.items():
                if isinstance(content, str):
                    atomic_write_text(tmp / name, content)
                else:
                    atomic_write_json(tmp / name, content)
        shutil.rmtree(stage, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
