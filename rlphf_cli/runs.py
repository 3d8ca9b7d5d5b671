"""The run directory contract: atomic writes, resolved recipe and environment first, events,
and stage markers that let a rerun skip finished work whose inputs did not change."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from rlphf_cli import __version__

# Never written into a run directory, whatever their values are: keys with one of these words
# ('hf_token', 'api_key'), but not 'max_new_tokens', a recipe setting the record must keep.
SECRET_KEY_WORDS = ("api_key", "apikey", "token", "secret", "password")
TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors",
                    "tokenizers", "openai", "vllm", "bitsandbytes")


# --------------------------------------------------------------------------------------------
# Atomic writes


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary sibling, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()  # not mkdtemp: its 0700 would be published with the folder
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class JsonlAppender:
    """Append records to a JSONL file, flushed per record, so a killed process loses at most one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a torn last line (a crash mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a file or of every file in a folder (names and bytes)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Environment


def redact(obj: Any) -> Any:
    """Drop values of keys that look like secrets (defence in depth: recipes hold env var names)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            lowered = str(key).lower()
            words = "_" + "_".join(re.split(r"[^a-z0-9]+", lowered)) + "_"
            is_secret = any(f"_{word}_" in words for word in SECRET_KEY_WORDS) and not lowered.endswith("_env")
            out[key] = "<redacted>" if is_secret and value not in (None, "") else redact(value)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_description() -> str:
    try:
        import torch
    except ImportError:
        return "cpu (torch not installed)"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda x{len(names)}: {', '.join(names)}"
    return f"cpu ({os.cpu_count()} cores)"


def environment(seed: int | None = None) -> dict:
    versions = {"rlphf": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "versions": versions,
        "git_sha": git_sha(Path(__file__).parent),
        "device": device_description(),
        "platform": platform.platform(),
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------
# The run directory


class RunDir:
    """runs/<name>/: see DESIGN.md, "The run directory"."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | os.PathLike, recipe=None) -> RunDir:
        """Create the folder; with a recipe, write recipe.yaml and env.json before any work."""
        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        if recipe is not None:
            import yaml

            resolved = redact(yaml.safe_load(recipe.to_yaml()))
            atomic_write_text(run.root / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
            atomic_write_json(run.root / "env.json", environment(recipe.seed))
        return run

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # Artifact locations, in one place.
    def rollouts(self) -> Path:
        return self.path("rollouts.jsonl")

    def annotations(self, pref_id: str) -> Path:
        return self.path("annotations", f"{pref_id}.jsonl")

    def reward_model(self, pref_id: str) -> Path:
        return self.path("rm", pref_id)

    def policy(self, name: str) -> Path:
        return self.path("policy", name)

    def soup(self, combo: str) -> Path:
        return self.path("soups", combo)

    def generations(self, system: str, combo: str) -> Path:
        return self.path("generations", system, f"{combo}.jsonl")

    def judgment(self, system: str, baseline: str) -> Path:
        return self.path("judgments", f"{system}_vs_{baseline}.json")

    def report_dir(self) -> Path:
        return self.path("report")

    # Events and markers.
    def log_event(self, stage: str, event: str, **fields: Any) -> None:
        record = {"time": time.time(), "stage": stage, "event": event, **fields}
        with JsonlAppender(self.path("events.jsonl")) as log:
            log.write(redact(record))

    def events(self) -> list[dict]:
        path = self.path("events.jsonl")
        return read_jsonl(path) if path.exists() else []

    def _marker(self, stage: str) -> Path:
        return self.path(".markers", f"{stage.replace('/', '__')}.json")

    def is_done(self, stage: str, inputs_fingerprint: str) -> bool:
        marker = self._marker(stage)
        if not marker.exists():
            return False
        try:
            return json.loads(marker.read_text()).get("fingerprint") == inputs_fingerprint
        except (OSError, json.JSONDecodeError):
            return False

    def mark_done(self, stage: str, inputs_fingerprint: str, **info: Any) -> None:
        atomic_write_json(self._marker(stage), {"stage": stage, "fingerprint": inputs_fingerprint,
                                                "time": time.time(), **info})

    def clear_marker(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)

    @contextlib.contextmanager
    def stage(self, name: str, **fields: Any) -> Iterator[dict]:
        """Log start and end (wall time, outcome) of a stage to events.jsonl."""
        start = time.time()
        self.log_event(name, "start", **fields)
        info: dict[str, Any] = {}
        try:
            yield info
        except BaseException as exc:
            self.log_event(name, "end", outcome="failed", wall_s=round(time.time() - start, 3),
                           error=f"{type(exc).__name__}: {exc}"[:500], **info)
            raise
        self.log_event(name, "end", outcome="ok", wall_s=round(time.time() - start, 3), **info)
