"""Prompt sets: built-in ones shipped with the package, local JSON/JSONL/dataset folders, hub datasets.

Every loader returns records {"id": str, "instruction": str}: `instruction` is the `prompt` field,
or `instruction` joined with the optional `input` as Alpaca does.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError

# Prompt set names that are not paths: shipped with the package, or a hub dataset.
BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"


def builtin_data_dir() -> Path:
    return Path(str(resources.files("rlphf_cli") / "models" / "data"))


def _prompt_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "a prompt record is not an object"
    for key in ("prompt", "instruction", "input"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"'{key}' is not a string"
    if not (row.get("prompt") or row.get("instruction")):
        return "a prompt record needs a non-empty 'prompt' or 'instruction'"
    return None


def _records_from_rows(rows, source: str) -> list[dict]:
    records = []
    for i, row in enumerate(rows):
        problem = _prompt_problem(row)
        if problem:
            raise InputError(f"{source}: record {i}: {problem}")
        if row.get("prompt"):
            text = row["prompt"]
        else:
            text = row["instruction"]
            if row.get("input"):
                text = f"{text}\n\n{row['input']}"
        record = {"id": str(row.get("id", f"{i:05d}")), "instruction": text}
        for extra in ("topic", "keyword"):
            if extra in row:
                record[extra] = row[extra]
        records.append(record)
    return records


def _read_file(path: Path) -> list:
    if path.suffix == ".jsonl":
        return files.read_jsonl(path, "prompt", check=_prompt_problem)
    data = files.read_json(path, "prompts")
    if isinstance(data, dict):
        data = data.get("data", data.get("prompts", [data]))
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of prompt records")
    return data


def _load_from_disk(path: Path, spec: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise InputError(f"{spec}: not a saved dataset folder ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def load_prompts(spec: str, limit: int | None = None) -> list[dict]:
    """Load prompts from 'builtin:NAME', a JSON/JSONL file, a saved HF dataset folder, or 'hf:name[:split]'."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        path = builtin_data_dir() / f"{name}.jsonl"
        if not path.is_file():
            available = sorted(p.stem for p in builtin_data_dir().glob("*.jsonl"))
            raise InputError(f"unknown built-in prompt set '{name}' (available: {', '.join(available) or 'none'})")
        records = _records_from_rows(_read_file(path), spec)
    elif spec.startswith(HUB_PREFIX):
        from rlphf_cli.hub import load_dataset_split

        name, _, split = spec[len(HUB_PREFIX):].partition(":")
        records = _records_from_rows(load_dataset_split(name, split or "train"), spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"{spec}: file not found")
        if path.is_dir():
            records = _records_from_rows(_load_from_disk(path, spec), spec)
        else:
            records = _records_from_rows(_read_file(path), spec)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise InputError(f"{spec}: no prompts")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise InputError(f"{spec}: duplicate ids")
    return records
