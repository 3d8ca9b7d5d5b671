"""Built-in models cached under rlphf_home(): built once, under a file lock, into a temporary folder
renamed into place, so concurrent processes never see half a model."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

BUILD_INFO = "build.json"


def rlphf_home() -> Path:
    return Path(os.environ.get("RLPHF_HOME", "~/.cache/rlphf")).expanduser()


def is_built(path: Path) -> bool:
    return (path / BUILD_INFO).is_file() and (path / "config.json").is_file()


def read_build_info(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / BUILD_INFO).read_text())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held while building; other processes wait, then find the model built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_built(target: Path, build: Callable[[], object], force: bool = False) -> Path:
    """`target` once built; `build()` (which must publish `target` atomically) runs first if it is
    missing or `force`, at most once at a time across processes."""
    if is_built(target) and not force:
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if is_built(target) and not force:  # another process built it while we waited
            return target
        build()
    return target
