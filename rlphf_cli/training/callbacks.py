"""Trainer callbacks: metrics JSONL per logging step, progress, and Ctrl-C -> checkpoint and stop."""

from __future__ import annotations

import inspect
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlphf_cli.runs import JsonlAppender, atomic_write_text, read_jsonl

# progress(done, total[, info]): `info` holds the latest logged metrics (reward, kl, ...).
ProgressFn = Callable[..., None]


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def _accepts_info(progress: ProgressFn) -> bool:
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def normalize_logs(logs: dict[str, Any], reward_names: dict[str, str] | None = None) -> dict[str, Any]:
    """TRL's log keys plus short names: reward, rewards{<rm>: mean}, kl, completion_length, clipped_ratio."""
    out: dict[str, Any] = {}
    rewards = {}
    for key, value in logs.items():
        if key.startswith("rewards/") and key.endswith("/mean"):
            name = key[len("rewards/"):-len("/mean")]
            rewards[(reward_names or {}).get(name, name)] = value
    if "reward" in logs:
        out["reward"] = logs["reward"]
    if rewards:
        out["rewards"] = rewards
    if "kl" in logs:
        out["kl"] = logs["kl"]
    for key, short in (("rewards/accuracies", "accuracy"), ("rewards/margins", "margin")):  # DPO
        if key in logs:
            out[short] = logs[key]
    if "completions/mean_length" in logs:
        out["completion_length"] = logs["completions/mean_length"]
    if "completions/clipped_ratio" in logs:  # completions cut at max_completion_length
        out["clipped_ratio"] = logs["completions/clipped_ratio"]
    out.update(logs)
    return out


def loss_tracker(progress: Callable[[int, int], None] | None = None):
    """(callback, losses): the callback appends each logged training loss to `losses` and calls
    `progress(step, max_steps)` after every step (model builds: the tiny model, SFT)."""
    losses: list[float] = []

    class Track(_trainer_callback_base()):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress(state.global_step, state.max_steps)

    return Track(), losses


def make_callbacks(metrics_path: Path, progress: ProgressFn | None, reward_names: dict[str, str] | None = None):
    """(MetricsCallback, ProgressCallback|None, InterruptCallback) instances for one trainer."""
    base = _trainer_callback_base()

    class MetricsCallback(base):
        """Appends one JSON line per logging step; after a resume it continues the same file."""

        def __init__(self):
            self.path = Path(metrics_path)
            self.records: list[dict] = []
            self.offset = 0.0
            self._start = time.monotonic()
            self._appender: JsonlAppender | None = None

        def truncate_after(self, step: int) -> None:
            """Resuming from `step`: drop lines logged after it (they are recomputed)."""
            if not self.path.exists():
                return
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in kept))
            self.records = kept
            self.offset = kept[-1].get("wall_s", 0.0) if kept else 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self._start = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            if any(k.startswith(("train_runtime", "train_loss")) for k in logs) and "loss" not in logs:
                return  # the end-of-training summary, not a step
            record = {"step": state.global_step, "wall_s": round(self.offset + time.monotonic() - self._start, 3),
                      **normalize_logs(logs, reward_names)}
            if self._appender is None:
                self._appender = JsonlAppender(self.path)
            self._appender.write(record)
            self.records.append(record)

        def on_train_end(self, args, state, control, **kwargs):
            if self._appender is not None:
                self._appender.close()
                self._appender = None

    class ProgressCallback(base):
        def __init__(self):
            self.info = _accepts_info(progress)
            self.last: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self._send(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_runtime" not in logs:
                self.last = normalize_logs(logs, reward_names)
                if state.is_world_process_zero:
                    self._send(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self._send(state)

        def _send(self, state):
            if self.info:
                progress(state.global_step, state.max_steps, self.last)
            else:
                progress(state.global_step, state.max_steps)

    class InterruptCallback(base):
        """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop now."""

        def __init__(self):
            self.requested = False
            self.stopped_at: int | None = None
            self._previous = None

        def _handler(self, signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        def on_train_begin(self, args, state, control, **kwargs):
            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGINT, self._handler)

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = args.save_strategy != "no"
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.restore()

        def restore(self):
            if self._previous is not None:
                signal.signal(signal.SIGINT, self._previous)
                self._previous = None

    return MetricsCallback(), (ProgressCallback() if progress else None), InterruptCallback()


def _dumps(record: dict) -> str:
    import json

    return json.dumps(record, ensure_ascii=False, default=str)
