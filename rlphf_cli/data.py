"""Prompt sets: built-in ones shipped with the package, local JSON/JSONL/dataset folders, hub datasets.

Every loader returns records {"id": str, "instruction": str}: `instruction` is the `prompt` field,
or `instruction` joined with the optional `input` as Alpaca does.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rlphf_cli.errors import InputError

# Prompt set names that are not paths: shipped with the package, or a hub dataset.
BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"


def builtin_data_dir() -> Path:
    return Path(str(resources.files("rlphf_cli") / "models" / "data"))


def _records_from_rows(rows, source: str) -> list[dict]:
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{source}: record {i} is not an object")
        if row.get("prompt"):
            text = str(row["prompt"])
        elif row.get("instruction"):
            text = str(row["instruction"])
            if row.get("input"):
                text = f"{text}\n\n{row['input']}"
        else:
            raise InputError(f"{source}: record {i} has neither 'prompt' nor 'instruction'")
        record = {"id": str(row.get("id", f"{i:05d}")), "instruction": text}
        for extra in ("topic", "keyword"):
            if extra in row:
                record[extra] = row[extra]
        records.append(record)
    return records


def _read_file(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}: line {n}: invalid JSON ({exc.msg})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    return data if isinstance(data, list) else data.get("data", data.get("prompts", [data]))


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
        import datasets

        name, _, split = spec[len(HUB_PREFIX):].partition(":")
        records = _records_from_rows(datasets.load_dataset(name, split=split or "train"), spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"{spec}: file not found")
        if path.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            records = _records_from_rows(loaded, spec)
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
