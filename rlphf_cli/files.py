"""Reading input files, in one place: prompts, rollouts, annotations, generations, recipes, judge
templates, adapter configs.

Whatever is wrong with a file (missing, a folder, unreadable, not UTF-8, empty, truncated, invalid
JSON or YAML, records of the wrong shape) is one InputError naming the file, and the line where
there is one. Outputs of rlphf itself that a crash may have cut (a resumed generation file, the
judge cache) are read by `rlphf_cli.runs.read_jsonl`, which skips a torn line instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlphf_cli.errors import InputError

# check(record) -> what is wrong with it, or None.
RecordCheck = Callable[[dict], "str | None"]


def read_text(path: str | os.PathLike, what: str = "input") -> str:
    """The text of a UTF-8 file with something in it (a leading byte-order mark is dropped)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder, not a {what} file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         f"save the {what} file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise InputError(f"{path}: empty file (expected {what})")
    return text


def _json_problem(exc: json.JSONDecodeError, at_end: bool) -> str:
    return f"invalid JSON ({exc.msg}{'; the file looks truncated' if at_end else ''})"


def read_json(path: str | os.PathLike, what: str = "input") -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at_end = exc.pos >= len(text.rstrip())
        raise InputError(f"{path}: line {exc.lineno}: {_json_problem(exc, at_end)}") from None


def read_json_object(path: str | os.PathLike, what: str = "input") -> dict:
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object ({what}), got {_kind(value)}")
    return value


def read_jsonl(path: str | os.PathLike, what: str = "record", check: RecordCheck | None = None) -> list[dict]:
    """One JSON object per line (blank lines allowed). `check(record)` returns what is wrong with a
    record, or None; the first problem is an error naming the file and the line."""
    text = read_text(path, f"{what} JSONL")
    lines = text.splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            cut = n == last and not text.endswith("\n")
            raise InputError(f"{path}: line {n}: {_json_problem(exc, cut)}") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {n}: expected a {what} object, got {_kind(record)}")
        problem = check(record) if check is not None else None
        if problem:
            raise InputError(f"{path}: line {n}: {problem}")
        records.append(record)
    return records


def read_yaml(path: str | os.PathLike, what: str = "YAML") -> Any:
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: invalid YAML{where}: {problem}") from None


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null"}.get(type(value), type(value).__name__)
