"""The Judge protocol: which of two responses better fits one preference.

A request shows two responses in a fixed order: `a` is presented as "Output (a)", `b` as
"Output (b)"; swapping positions is the caller's business (annotate randomises, judge asks both).
Two uses: `annotate` (two-way: a or b) and `evaluate` (three-way: a, b or TIE).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

from rlphf_cli import files
from rlphf_cli.errors import InputError, did_you_mean
from rlphf_cli.preferences import Preference

Verdict = Literal["A", "B", "tie", "invalid"]
Use = Literal["annotate", "evaluate"]
USES: tuple[str, ...] = ("annotate", "evaluate")

# progress(done, total): called as results arrive (cached ones included).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class JudgeRequest:
    instruction: str
    a: str  # shown first, as "Output (a)"
    b: str  # shown second, as "Output (b)"
    pref: Preference  # its .criterion is the question
    use: Use = "evaluate"


@dataclass
class Judgment:
    verdict: Verdict
    raw: str = ""  # the backend's raw output (the judge's text, or the measures/log-probs as JSON)
    confidence: float | None = None  # probability of the verdict where the backend has one
    cached: bool = False
    requests: int = 0  # HTTP requests spent on it (retries and re-asks included)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why an answer is missing (transport failure), not a judge verdict
    answers: list[str] = field(default_factory=list)  # every raw answer, re-asks included

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JudgeStats:
    """Counters over a judge's lifetime; reported in summaries."""

    judged: int = 0
    cached: int = 0
    requests: int = 0
    retries: int = 0
    reasks: int = 0  # unparseable answers asked again
    invalid: int = 0
    failed: int = 0  # no answer at all after every retry (not cached: a rerun tries again)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Judge(Protocol):
    name: str
    stats: JudgeStats

    def judge_many(self, requests: Sequence[JudgeRequest], progress: ProgressFn | None = None) -> list[Judgment]:
        """One judgment per request, in the same order."""
        ...

    def check(self, prefs: Sequence[Preference]) -> None:
        """Raise InputError before any work if a preference cannot be judged by this backend."""
        ...

    def describe(self) -> dict:
        """Backend and model, for summaries (never a secret)."""
        ...


# --------------------------------------------------------------------------------------------
# Prompt templates

OPTION_A, OPTION_B, OPTION_TIE = "Output (a)", "Output (b)", "TIE"
PLACEHOLDERS = ("instruction", "output_a", "output_b", "criterion")
REQUIRED_PLACEHOLDERS = ("instruction", "output_a", "output_b")  # what the judge must see
# Several pairs in one request (judge.openai.batch_size): `<use>_batch` frames the numbered pairs, each
# rendered with `batch_pair`. (allowed, required) placeholders of every kind of template:
TEMPLATE_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "annotate": (PLACEHOLDERS, REQUIRED_PLACEHOLDERS),
    "evaluate": (PLACEHOLDERS, REQUIRED_PLACEHOLDERS),
    "annotate_batch": (("criterion", "count", "pairs"), ("pairs",)),
    "evaluate_batch": (("criterion", "count", "pairs"), ("pairs",)),
    "batch_pair": (("index", "instruction", "output_a", "output_b"), ("index", "instruction", "output_a", "output_b")),
}
_ANY_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def shipped_templates_dir() -> Path:
    return Path(str(resources.files("rlphf_cli") / "judges" / "templates"))


def template_path(pref: Preference, use: str, folder: str | Path | None = None) -> Path:
    """`<folder>/<ID>_<use>.txt`, else the shipped one, else the generic `default_<use>.txt`
    (which reads the preference's criterion text): recipe-defined preferences work unchanged."""
    if use not in TEMPLATE_KINDS:
        raise ValueError(use)
    candidates = []
    for base in ([Path(folder).expanduser()] if folder else []) + [shipped_templates_dir()]:
        candidates += [base / f"{pref.id}_{use}.txt", base / f"{pref.alias}_{use}.txt"]
    for base in ([Path(folder).expanduser()] if folder else []) + [shipped_templates_dir()]:
        candidates.append(base / f"default_{use}.txt")
    for path in candidates:
        if path.is_file():
            return path
    raise InputError(f"no judge template for {pref.id} ({use}) in {folder or shipped_templates_dir()}")


def fill(template: str, values: dict[str, str]) -> str:
    """Fill the template's placeholders in one pass: braces inside the values (responses) are never
    read as placeholders."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def render_template(template: str, instruction: str, a: str, b: str, criterion: str) -> str:
    """Fill {instruction} {output_a} {output_b} {criterion} in one pass."""
    return fill(template, {"instruction": instruction, "output_a": a, "output_b": b, "criterion": criterion})


def check_template(text: str, path: Path, use: str = "evaluate") -> None:
    """Raise InputError, naming the file, for a template that cannot work: a misspelt placeholder
    (it would reach the judge verbatim) or a missing response."""
    allowed, required = TEMPLATE_KINDS[use]
    for name in _ANY_PLACEHOLDER.findall(text):
        if name not in allowed:
            raise InputError(f"{path}: unknown placeholder {{{name}}}{did_you_mean(name, allowed)}")
    for name in required:
        if f"{{{name}}}" not in text:
            raise InputError(f"{path}: the template has no {{{name}}}: the judge would never see it")


class TemplateSet:
    """Template texts by (preference id, use): read from `folder` (else the shipped ones) and
    checked once, or given (`texts`, what a judge spec holds: then nothing else is read)."""

    def __init__(self, folder: str | Path | None = None, texts: dict[tuple[str, str], str] | None = None):
        self.folder = folder
        self._given = texts is not None
        self._texts: dict[tuple[str, str], str] = dict(texts or {})

    def text(self, pref: Preference, use: str) -> str:
        key = (pref.id, use)
        if key not in self._texts:
            if self._given:
                raise InputError(f"the judge was not set up with a template for {pref.id} ({use})")
            path = template_path(pref, use, self.folder)
            text = files.read_text(path, "judge template")
            check_template(text, path, use)
            self._texts[key] = text
        return self._texts[key]

    def render(self, request: JudgeRequest) -> str:
        return render_template(self.text(request.pref, request.use), request.instruction, request.a, request.b,
                               request.pref.criterion)


def parse_verdict(text: str) -> Verdict:
    """'Output (a)' -> A, 'Output (b)' -> B, 'TIE' -> tie; anything else (both, neither) -> invalid.

    Lenient on case, spacing and brackets ('output(b)', '**Output (A)**', 'Output a'), strict on
    ambiguity: an answer naming both outputs is invalid, never a tie.
    """
    lowered = text.strip().lower()
    found_a = re.search(r"output\s*[\(\[]?\s*a\s*[\)\]]?(?![a-z])", lowered) is not None
    found_b = re.search(r"output\s*[\(\[]?\s*b\s*[\)\]]?(?![a-z])", lowered) is not None
    found_tie = re.search(r"\btie\b", lowered) is not None
    hits = [v for v, hit in (("A", found_a), ("B", found_b), ("tie", found_tie)) if hit]
    if len(hits) == 1:
        return hits[0]  # type: ignore[return-value]
    # 'Output (a)' alone on the first line wins over an explanation that mentions both.
    first = lowered.splitlines()[0] if lowered else ""
    if first and first != lowered:
        return parse_verdict(first)
    return "invalid"


class BaseJudge(abc.ABC):
    """Cache lookup, in-batch de-duplication, counters and progress; a backend implements
    `_judge_uncached(items, deliver)` calling `deliver(index, judgment)` as each result arrives."""

    name = "base"
    price = None  # USD per million tokens (a recipe PriceSection) where requests are paid

    def __init__(self, spec, cache_path: str | Path | None = None):
        from rlphf_cli.judges.cache import JudgeCache
        from rlphf_cli.judges.cost import Budget, Spend

        self.spec = spec  # a specs.JudgeSpec
        self.settings = spec.settings
        self.templates = TemplateSet(texts={(pref_id, use): text for pref_id, use, text in spec.templates})
        self.stats = JudgeStats()
        self.cache = JudgeCache(cache_path) if cache_path else None
        self.budget = Budget(spec.max_cost)  # a command's judges may share one (rlphf_cli.judges.get_judge)
        self.spend = Spend()  # what this judge paid in this process

    # What a backend describes itself by; part of every cache key.
    def model_id(self) -> str:
        return ""

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_id()}

    def check(self, prefs: Sequence[Preference]) -> None:
        uses = sorted({use for _, use, _ in self.spec.templates}) or USES  # what this judge was set up for
        for pref in prefs:
            for use in uses:
                self.templates.text(pref, use)

    def use_cache(self, path: str | Path | None) -> None:
        """Attach a cache file unless one is attached already (callers pick a default place)."""
        from rlphf_cli.judges.cache import JudgeCache

        if self.cache is None and path is not None:
            self.cache = JudgeCache(path)

    def cache_key(self, request: JudgeRequest) -> str:
        from rlphf_cli.judges.cache import cache_key

        # a and b are in presentation order, so the order is part of the key.
        return cache_key(self.name, self.model_id(), self.framing(request), request.pref.criterion,
                         request.instruction, request.a, request.b, "a-b")

    def framing(self, request: JudgeRequest) -> str:
        """The template text(s) a request is asked with: what its verdict depends on besides the pair."""
        return self.templates.text(request.pref, request.use)

    def from_cache(self, record: dict) -> Judgment:
        """A cached record back into a judgment; backends re-parse the raw output here. The tokens it
        cost when it was asked stay with it: an output's cost counts every verdict behind it."""
        return Judgment(verdict=record["verdict"], raw=record.get("raw", ""), confidence=record.get("confidence"),
                        prompt_tokens=record.get("prompt_tokens", 0), completion_tokens=record.get("completion_tokens", 0))

    def _split(self, requests: Sequence[JudgeRequest]) -> tuple[dict[int, dict], dict[str, list[int]]]:
        """({index: cache record} of the requests the cache answers, {key: indices} of the others);
        identical requests (same key) are judged once and shared."""
        cached: dict[int, dict] = {}
        pending: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = self.cache_key(request) if self.cache is not None else str(index)
            record = self.cache.get(key) if self.cache is not None else None
            if record is not None:
                cached[index] = record
            else:
                pending.setdefault(key, []).append(index)
        return cached, pending

    def plan(self, requests: Sequence[JudgeRequest]):
        """The requests `judge_many(requests)` would send, and their expected tokens and cost
        (a cost.RequestPlan); nothing is sent. Judges that send no paid request plan none."""
        from rlphf_cli.judges.cost import RequestPlan

        cached, _ = self._split(requests)
        return RequestPlan(judgments=len(requests), cached=len(cached), backend=self.name)

    def judge_many(self, requests: Sequence[JudgeRequest], progress: ProgressFn | None = None) -> list[Judgment]:
        total = len(requests)
        results: list[Judgment | None] = [None] * total
        done = 0

        def advance(index: int, judgment: Judgment) -> None:
            nonlocal done
            results[index] = judgment
            done += 1
            if progress is not None:
                progress(done, total)

        cached, pending = self._split(requests)
        for index, record in cached.items():
            judgment = self.from_cache(record)
            judgment.cached = True
            self.stats.cached += 1
            advance(index, judgment)

        keys = list(pending)
        items = [(n, requests[pending[key][0]]) for n, key in enumerate(keys)]

        def deliver(n: int, judgment: Judgment) -> None:
            key = keys[n]
            self._count(judgment)
            if self.cache is not None and judgment.error is None:
                self.cache.put(key, self._cache_record(requests[pending[key][0]], judgment))
            for index in pending[key]:
                advance(index, judgment)

        if items:
            self._judge_uncached(items, deliver)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"{self.name} judge returned no result for {len(missing)} requests")
        return results  # type: ignore[return-value]

    def _count(self, judgment: Judgment) -> None:
        self.stats.judged += 1
        self.stats.requests += judgment.requests
        self.stats.prompt_tokens += judgment.prompt_tokens
        self.stats.completion_tokens += judgment.completion_tokens
        if judgment.error is not None:
            self.stats.failed += 1
        elif judgment.verdict == "invalid":
            self.stats.invalid += 1

    def _cache_record(self, request: JudgeRequest, judgment: Judgment) -> dict:
        # No instruction or responses (the key stands for them) and never a secret.
        return {"backend": self.name, "model": self.model_id(), "pref": request.pref.id, "use": request.use,
                "verdict": judgment.verdict, "raw": judgment.raw, "answers": judgment.answers,
                "confidence": judgment.confidence,
                "prompt_tokens": judgment.prompt_tokens, "completion_tokens": judgment.completion_tokens}

    @abc.abstractmethod
    def _judge_uncached(self, items: list[tuple[int, JudgeRequest]], deliver: Callable[[int, Judgment], None]) -> None:
        """Judge the requests the cache did not answer; call `deliver(index, judgment)` for each."""


class UncachedJudge(BaseJudge):
    """An offline, deterministic judge that costs next to nothing: no verdict cache to keep."""

    def __init__(self, spec, cache_path=None):
        super().__init__(spec, cache_path=None)

    def use_cache(self, path) -> None:
        pass
