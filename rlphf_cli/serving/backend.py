"""What the HTTP layer asks of a decoding backend (transformers on CPU/GPU, vLLM on GPUs).

A backend takes a Job (prompt ids, soup, sampling) and streams Events for its `n` choices:
Delta (new text of one choice) and Finish (its whole text, why it ended, tokens generated). The
API turns them into OpenAI's chunks or one response. Closing the stream early (a client that
went away) cancels the job and frees its batch slots.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from rlphf_cli.serving.policies import PolicySet, Soup


@dataclass(frozen=True)
class Sampling:
    """How one request samples: the recipe's `generate` settings, with what the request may set
    (temperature, top_p, max_tokens, min_tokens, stop, seed, n) overridden."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_tokens: int = 64
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh seed per request
    n: int = 1


@dataclass(eq=False)
class Job:
    id: str
    prompt_ids: list[int]
    soup: Soup
    sampling: Sampling
    prompt_text: str = ""  # the rendered prompt: seeded rows draw from a stream keyed by it (rlphf_cli.sampling)
    on_leave: Callable[[], None] | None = None  # called when the job leaves the waiting queue

    def left_queue(self) -> None:
        """The job began decoding, or ended before (from any thread; the callback is idempotent)."""
        if self.on_leave is not None:
            self.on_leave()


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Finish:
    index: int
    text: str  # the choice's whole answer; the Deltas before it concatenate to it
    reason: str  # 'stop' (end of answer or a stop string) or 'length'
    completion_tokens: int


class BackendError(Exception):
    """Decoding failed for a reason that is not the request's fault (HTTP 500)."""

    status = 500
    code: str | None = None


class BackendUnavailable(BackendError):
    """The backend cannot decode any more (its decode thread died): HTTP 503 at once, never a hang."""

    status = 503
    code = "service_unavailable"


@dataclass
class Counters:
    requests: int = 0
    completion_tokens: int = 0
    cancelled: int = 0  # choices dropped because their client went away


class Backend(abc.ABC):
    """A loaded model that decodes jobs; see the module docstring."""

    name = ""
    mixes_logits = False  # can it decode a Soup with `mixed` (compose "logits")?

    def __init__(self, policies: PolicySet, tokenizer, context_length: int, model_name: str):
        self.policies = policies
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.model_name = model_name
        self.counters = Counters()
        from rlphf_cli.serving.metrics import ServeMetrics

        self.metrics = ServeMetrics()

    @property
    def dead(self) -> str | None:
        """Why the backend cannot serve any more (None while it can)."""
        return None

    def count_cancelled(self, choices: int) -> None:
        """Choices dropped because their client went away (for /health and /metrics)."""
        self.counters.cancelled += choices
        self.metrics.cancelled.inc(choices)

    def running_rows(self) -> int:
        """Rows (choices) decoding now, for /metrics."""
        return 0

    def start(self) -> None:  # noqa: B027 (an optional hook)
        """Called when the server starts serving (in its event loop)."""

    def stop(self) -> None:  # noqa: B027 (an optional hook)
        """Called when the server shuts down."""

    @abc.abstractmethod
    def stream(self, job: Job) -> AsyncIterator[Delta | Finish]:
        """Events of the job's choices, each choice ending with its Finish."""

    def status(self) -> dict:
        """Figures for GET /health."""
        c = self.counters
        return {"requests": c.requests, "completion_tokens": c.completion_tokens, "cancelled": c.cancelled}


class TextStream:
    """One choice's growing answer -> the deltas a client sees.

    The answer is the decoded text with surrounding whitespace stripped (as `rlphf generate` writes
    it) and cut before the first stop string. While decoding goes on, whitespace at the end, an
    unfinished UTF-8 character (U+FFFD) and anything that could be the start of a stop string are
    held back, so the deltas always concatenate to the final answer.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.sent = ""
        self.stopped = False  # a stop string appeared: the choice is finished

    def _cut(self, text: str) -> str:
        visible = text.lstrip()
        cuts = [i for i in (visible.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return visible[:min(cuts)]
        return visible

    def update(self, text: str) -> str:
        """The new delta for the text decoded so far ('' when nothing can be sent yet)."""
        visible = self._cut(text)
        if self.stopped:
            return self._advance(visible.rstrip())
        held = 0
        for stop in self.stop:  # the longest end of the text that may begin a stop string
            for k in range(min(len(stop) - 1, len(visible)), held, -1):
                if stop.startswith(visible[-k:]):
                    held = k
                    break
        ready = visible[:len(visible) - held].rstrip("\ufffd").rstrip()
        return self._advance(ready)

    def finish(self, text: str) -> tuple[str, str]:
        """(last delta, whole answer) when decoding ended."""
        final = self._cut(text).strip()
        return self._advance(final), final

    def _advance(self, target: str) -> str:
        if len(target) > len(self.sent) and target.startswith(self.sent):
            delta, self.sent = target[len(self.sent):], target
            return delta
        return ""
