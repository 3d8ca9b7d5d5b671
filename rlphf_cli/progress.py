"""Progress as plain lines, for output that is not a terminal (a pipe, a CI log), where a live bar
is not drawn: a long step prints `what: done/total, elapsed, ~left` at a steady interval."""

from __future__ import annotations

import os
import sys
import time

# Seconds between two lines (the issue asks for 10-30 s); a test sets it lower.
INTERVAL_ENV = "RLPHF_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 15.0


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def line(what: str, done: float, total: float | None, elapsed: float, left: float | None = None) -> str:
    """'SFT: 40/200 (20%), 1m05s elapsed, ~4m20s left'; `left` defaults to the pace so far."""
    if left is None and total and done:
        left = elapsed * (total - done) / done
    count = f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"
    return f"{what}: {count}, {duration(elapsed)} elapsed" + (f", ~{duration(left)} left" if total and left else "")


class LineProgress:
    """A progress(done, total) callback that prints a line to stderr at most every `interval()`
    seconds (and the first and last update), whatever the output is."""

    def __init__(self, what: str):
        self.what, self.start, self.last = what, time.monotonic(), None

    def __call__(self, done: float, total: float | None = None, *_: object) -> None:
        now = time.monotonic()
        if self.last is None or now - self.last >= interval() or (total and done >= total):
            self.last = now
            print(line(self.what, done, total, now - self.start), file=sys.stderr, flush=True)
