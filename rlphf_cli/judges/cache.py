"""The judge cache: one JSONL line per verdict, appended as each verdict arrives.

Keyed by the sha256 of (backend, model, template text, criterion, instruction, A, B, order), so a
rerun asks nothing twice and a run killed with SIGKILL loses only the requests in flight. Each line
is written with a single `write()` on an O_APPEND descriptor: the kernel has it at once (a killed
process loses nothing written), and processes sharing one cache file do not interleave lines.
The raw judge output is kept, so parsing can be redone without new requests.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rlphf_cli.runs import fs_errors, read_jsonl


def cache_key(backend: str, model: str, template: str, criterion: str, instruction: str, a: str, b: str,
              order: str) -> str:
    blob = json.dumps([backend, model, template, criterion, instruction, a, b, order], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _ends_torn(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


class JudgeCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        if self.path.exists():
            for record in read_jsonl(self.path):  # a torn last line (killed mid-write) is skipped
                if isinstance(record, dict) and "key" in record:
                    self._records[record["key"]] = record
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def records(self) -> list[dict]:
        return list(self._records.values())

    def put(self, key: str, record: dict) -> None:
        record = {"key": key, **record}
        self._records[key] = record
        with fs_errors(self.path):
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                if _ends_torn(self.path):
                    os.write(self._fd, b"\n")  # keep the next record off a line a killed run left half-written
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            os.write(self._fd, line)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
