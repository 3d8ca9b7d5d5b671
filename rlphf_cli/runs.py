"""The run directory contract: atomic writes, resolved recipe and environment first, events,
and stage markers that let a rerun skip finished work whose inputs did not change.

Writing goes through the helpers here, so a file-system failure (no permission, a full disk, a file
size limit, a file where a folder should be) is a FileSystemError naming the path, never a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rlphf_cli import __version__
from rlphf_cli.errors import FileSystemError, InputError

TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors",
                    "tokenizers", "openai", "vllm", "bitsandbytes")


# --------------------------------------------------------------------------------------------
# File-system failures, named

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file size limit, e.g. `ulimit -f`, or the file system's)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (an immutable file or folder?)",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a file is where a folder should be",
    errno.EEXIST: "a file is where a folder should be",
    errno.EISDIR: "a folder is where a file should be",
}


def describe_os_error(exc: OSError) -> str:
    return _REASONS.get(exc.errno, exc.strerror or str(exc))


@contextlib.contextmanager
def fs_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError inside the block into a FileSystemError naming `path` (the path the user
    knows, not a temporary sibling)."""
    try:
        yield
    except FileSystemError:
        raise
    except OSError as exc:
        raise FileSystemError(f"{path}: {describe_os_error(exc)}") from None
    except Exception as exc:
        # Libraries written in Rust (safetensors, tokenizers) report an I/O error as their own
        # exception, with the errno in the message: "... File too large (os error 27)".
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise FileSystemError(f"{path}: {_REASONS.get(code, os.strerror(code))}") from None


def check_writable(path: str | os.PathLike) -> None:
    """Before any work: `path` can be made (or replaced). Walks up to the nearest existing folder and
    creates an unnamed temporary file there (nothing is left behind), so a file in the way, a
    missing permission, an immutable or read-only folder are found now, not after hours of work."""
    path = Path(path).expanduser()
    for ancestor in reversed(path.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise FileSystemError(f"{path}: {ancestor} is a file, not a folder")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    with fs_errors(path), tempfile.TemporaryFile(dir=folder):
        pass


def check_outputs(record, outputs: Sequence[str | os.PathLike], *, force: bool = False,
                  hint: str = "pass --force to replace it", anywhere: bool = False) -> RunDir | None:
    """Before any work: every output can be written, and none replaces a finished output of the
    run directory `record` (a specs.RunRecord) names unless `force` (the message says what would be
    replaced, then `hint`); with `anywhere`, an output outside it neither (a file that a stopped
    command left holds records its rerun would throw away). Returns the run directory when an output
    lies in it, or when it exists (the command runs against it, reading its outputs): call its `begin`
    before the first write."""
    root = Path(record.root)
    inside = [Path(p) for p in outputs if _within(Path(p), root)]
    for path in outputs:
        check_writable(path)
    if not force:
        for path in (map(Path, outputs) if anywhere else inside):
            if _finished(path):
                raise InputError(f"{path}: exists ({_describe_output(path)}); {hint}")
    return RunDir(root) if inside or (root / "recipe.yaml").is_file() else None


def begin_outputs(record, outputs: Sequence[str | os.PathLike], *, force: bool = False,
                  hint: str = "pass --force to replace it") -> RunDir | None:
    """After a job's inputs are checked, before its first write: `check_outputs`, then the run
    directory records the command (on the main process of a distributed launch). Without a
    `record` (a library call outside any run) the outputs are only checked to be writable."""
    if record is None:
        for path in outputs:
            check_writable(path)
        return None
    run = check_outputs(record, outputs, force=force, hint=hint)
    if run is not None and os.environ.get("RANK", "0") == "0":
        run.begin(record)
    return run


def _within(path: Path, root: Path) -> bool:
    return path.expanduser().resolve().is_relative_to(root.expanduser().resolve())


def _finished(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.is_file() and path.stat().st_size > 0


def _describe_output(path: Path) -> str:
    """What a finished output holds, from its own record where it has one."""
    made = f"written {time.strftime('%Y-%m-%d %H:%M', time.localtime(path.stat().st_mtime))}"
    if path.is_file() and path.suffix == ".jsonl":
        with open(path, "rb") as handle:
            return f"{sum(1 for line in handle if line.strip())} records, {made}"
    record = {}
    for name in ("soup.json", "training.json", "metrics.json"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((path / name).read_text(encoding="utf-8"))
            break
    if "method" in record and "weights" in record:
        return f"a soup made with '{record['method']}', weights {', '.join(f'{w:g}' for w in record['weights'])}, {made}"
    if "steps" in record:
        return f"a model trained {record['steps']} steps, {made}"
    return made


# --------------------------------------------------------------------------------------------
# Atomic writes


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def _clear_stale_siblings(path: Path) -> None:
    """Remove temporary siblings of `path` left by a process that was killed (SIGKILL, power loss):
    their writer is gone, so they can never be renamed into place."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary sibling, fsync, then rename: readers never see half a file."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with fs_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale_siblings(path)
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
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed.
    A file-system failure inside the block is a FileSystemError naming `path`."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    with fs_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_siblings(path)
        tmp.mkdir()  # not mkdtemp: its 0700 would be published with the folder
    try:
        with fs_errors(path):
            yield tmp
            if path.exists():
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "exists", str(path))
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
        with fs_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        with fs_errors(self.path):
            self._handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._handle.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush was reported by write()
            self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file that rlphf wrote; a torn line (a crash mid-write) is skipped. Input files
    are read by rlphf_cli.files, which names such a line instead."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; not a file rlphf wrote") from None
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


# --------------------------------------------------------------------------------------------
# Environment


_SECRETS: set[str] = set()


def register_secrets(names: Sequence[str]) -> None:
    """Remember the values of the environment variables a recipe names in `*_env` keys (API keys):
    `scrub` keeps them out of everything written into a run directory. Secrets are known by what
    they are (values read from the environment), not guessed from key names."""
    register_secret_values(os.environ.get(name, "") for name in names)


def register_secret_values(values: Iterable[str]) -> None:
    """Remember secret values given to a command directly (`rlphf serve --api-key`)."""
    _SECRETS.update(value for value in values if len(value) >= 4)


def scrub(obj: Any) -> Any:
    """`obj` with every registered secret value replaced by '<secret>'."""
    if not _SECRETS:
        return obj
    if isinstance(obj, str):
        for secret in _SECRETS:
            obj = obj.replace(secret, "<secret>")
        return obj
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
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

# The command this process runs ({'command': 'rlphf generate', 'options': {...}}), set by the CLI
# for the `command` event of every run directory it writes into.
_INVOCATION: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rlphf_invocation", default=None)


def set_invocation(invocation: dict | None) -> contextvars.Token:
    return _INVOCATION.set(invocation)


def reset_invocation(token: contextvars.Token) -> None:
    _INVOCATION.reset(token)


class RunDir:
    """runs/<name>/: see DESIGN.md, "The run directory"."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | os.PathLike, record=None, *, run_recipe: bool = False) -> RunDir:
        """Create the folder and, with a record (specs.RunRecord), write it (see `begin`)."""
        run = cls(root)
        if record is None:
            with fs_errors(run.root):
                run.root.mkdir(parents=True, exist_ok=True)
        else:
            run.begin(record, run_recipe=run_recipe)
        return run

    def begin(self, record, *, run_recipe: bool = False) -> RunDir:
        """Before the first write into the run directory: create it, write recipe.yaml (the resolved
        recipe, reusable as is) and env.json when it has none, and log the command to events.jsonl.
        `record` is a specs.RunRecord.

        recipe.yaml is the run's recipe: a stage command never rewrites it (its own settings go to
        its output's record and to its event); `rlphf run` (`run_recipe`) makes its recipe the run's."""
        import yaml

        register_secrets(record.secrets)
        recipe_file = self.path("recipe.yaml")
        text = scrub(record.recipe_yaml)
        with fs_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        if not recipe_file.exists() or run_recipe and recipe_file.read_text(encoding="utf-8") != text:
            yaml.safe_load(text)  # what is written must read back
            atomic_write_text(recipe_file, text)
            atomic_write_json(self.path("env.json"), scrub(environment(record.seed)))
        self.log_command(record)
        return self

    def log_command(self, record) -> None:
        """One `command` event per command line and run directory, with the options and recipe
        overrides it was given."""
        invocation = _INVOCATION.get()
        if not invocation or str(self.root.resolve()) in invocation.setdefault("logged", []):
            return
        invocation["logged"].append(str(self.root.resolve()))
        fields = {k: v for k, v in invocation.items() if k != "logged"}
        self.log_event("command", "command", recipe=record.source, overrides=dict(record.overrides), **fields)

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
            log.write(scrub(record))

    def events(self) -> list[dict]:
        path = self.path("events.jsonl")
        return read_jsonl(path) if path.exists() else []

    def _marker(self, stage: str) -> Path:
        return self.path(".markers", f"{stage.replace('/', '__')}.json")

    def marker(self, stage: str) -> dict | None:
        """What `mark_done` recorded for a unit (None when there is no readable marker)."""
        try:
            marker = json.loads(self._marker(stage).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def is_done(self, stage: str, inputs_fingerprint: str) -> bool:
        return (self.marker(stage) or {}).get("fingerprint") == inputs_fingerprint

    def outputs_fingerprint(self, outputs: Sequence[Path], known: dict | None = None) -> tuple[str | None, dict]:
        """Content hash of output files and folders as they are on disk now, and the per-file record
        {relative path: [size, mtime_ns, sha256]} that lets the next call skip rehashing files whose
        size and modification time did not change. None when an output is missing."""
        known = known or {}
        files: dict[str, list] = {}
        for output in outputs:
            if not output.exists():
                return None, {}
            for file in sorted([output] if output.is_file() else (p for p in output.rglob("*") if p.is_file())):
                name = str(file.relative_to(self.root)) if file.is_relative_to(self.root) else str(file)
                stat = file.stat()
                seen = known.get(name)
                same = seen is not None and seen[:2] == [stat.st_size, stat.st_mtime_ns]
                files[name] = [stat.st_size, stat.st_mtime_ns, seen[2] if same else file_sha256(file)]
        return fingerprint({name: entry[2] for name, entry in files.items()}), files

    def mark_done(self, stage: str, inputs_fingerprint: str, **info: Any) -> None:
        atomic_write_json(self._marker(stage), {"stage": stage, "fingerprint": inputs_fingerprint,
                                                "time": time.time(), **info})

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
