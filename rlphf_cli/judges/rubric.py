"""The `rubric` judge: an offline, deterministic PROXY for an LLM judge.

It does not read the responses the way a person or an LLM would. Per preference it computes one
text measure with real libraries and prefers the response with more of it:

| pref | measure (higher = more of the preference)                                        |
|------|-----------------------------------------------------------------------------------|
| P1A  | minus the reading grade (mean of Flesch-Kincaid and Coleman-Liau, `readability`)  |
| P1B  | the reading grade                                                                 |
| P2A  | minus the word count                                                              |
| P2B  | the number of distinct content words (stop words and repeats add nothing)         |
| P3A  | friendliness: VADER compound sentiment + exclamation, emoji/emoticon, joke cues   |
|      | - rude cues                                                                       |
| P3B  | minus friendliness                                                                |
| general | overall quality for the RLHF baseline: distinct content words (at most 40) times  |
|      | the share of distinct words (substance without repetition)                        |

Two measures whose relative difference |a - b| / max(|a|, |b|, 1) is below `judge.rubric.tie_margin`
make a tie. It exists for CPU runs and tests; use the `openai` or `hf` judge for real labels.
Recipe-defined preferences have no measure: judge them with an LLM.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence

from rlphf_cli.errors import InputError
from rlphf_cli.judges.base import JudgeRequest, Judgment, UncachedJudge
from rlphf_cli.preferences import Preference, PreferenceSet

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*|[^\sA-Za-z0-9]")
_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*|[0-9]+")
_EMOJI = re.compile(r"[\U0001F300-\U0001FAFF\u2600-\u27BF]|[:;]-?[)D(P]|<3|\^_\^")
_JOKE_CUES = re.compile(
    r"\b(haha\w*|hehe\w*|lol|lmao|joke|joking|funny|pun|buddy|pal|my friend|friend|hey|yay|awesome|fun)\b", re.I
)
_RUDE_CUES = re.compile(
    r"\b(whatever|obviously|duh|ugh|stupid|dumb|idiot\w*|figure it out|not my problem|don'?t bother|who cares"
    r"|seriously|waste of|just google|go away|leave me alone|annoying)\b",
    re.I,
)
STOP_WORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
    now of off on once only or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until up very was we
    were what when where which while who whom why will with would you your yours yourself yourselves""".split()
)


def _tokenized(text: str) -> list[str]:
    """One sentence per line, tokens separated by spaces: the input `readability` expects."""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    return [" ".join(_TOKEN.findall(s)) for s in sentences if _TOKEN.findall(s)]


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def reading_grade(text: str) -> float:
    """Mean of the Flesch-Kincaid and Coleman-Liau grade levels (0 for text without words)."""
    import readability

    if not words(text):
        return 0.0
    grades = readability.getmeasures(_tokenized(text), lang="en")["readability grades"]
    return (grades["Kincaid"] + grades["Coleman-Liau"]) / 2


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def friendliness(text: str) -> float:
    compound = _vader().polarity_scores(text)["compound"] if text.strip() else 0.0
    cues = (0.15 * min(text.count("!"), 3) + 0.3 * min(len(_EMOJI.findall(text)), 2)
            + 0.3 * min(len(_JOKE_CUES.findall(text)), 3) - 0.3 * min(len(_RUDE_CUES.findall(text)), 3))
    return compound + cues


def content_words(text: str) -> int:
    return len({w.lower() for w in words(text) if w.lower() not in STOP_WORDS})


def overall_quality(text: str) -> float:
    tokens = [w.lower() for w in words(text)]
    if not tokens:
        return 0.0
    return min(content_words(text), 40) * len(set(tokens)) / len(tokens)


MEASURES: dict[str, tuple[str, Callable[[str], float]]] = {
    "P1A": ("minus reading grade", lambda t: -reading_grade(t)),
    "P1B": ("reading grade", reading_grade),
    "P2A": ("minus word count", lambda t: -float(len(words(t)))),
    "P2B": ("distinct content words", lambda t: float(content_words(t))),
    "P3A": ("friendliness", friendliness),
    "P3B": ("minus friendliness", lambda t: -friendliness(t)),
    "general": ("overall quality", overall_quality),
}


def _pref_id(pref: Preference | str) -> str:
    if isinstance(pref, str):
        try:
            return PreferenceSet.catalog().get(pref).id
        except InputError:
            return pref
    return pref.id


def has_measure(pref: Preference | str) -> bool:
    return _pref_id(pref) in MEASURES


def measure_name(pref: Preference | str) -> str:
    _require(pref)
    return MEASURES[_pref_id(pref)][0]


def _require(pref: Preference | str) -> None:
    if not has_measure(pref):
        raise InputError(
            f"preference '{_pref_id(pref)}' has no rubric measure (the rubric covers {', '.join(MEASURES)}); "
            "judge it with an LLM judge: --judge openai or --judge hf"
        )


def measure(pref: Preference | str, text: str) -> float:
    """How much of a preference a text shows (higher = more); a proxy, see the module docstring."""
    _require(pref)
    return float(MEASURES[_pref_id(pref)][1](text))


def compare(ma: float, mb: float, tie_margin: float) -> str:
    """'A', 'B' or 'tie': a tie when the relative difference is below the margin."""
    scale = max(abs(ma), abs(mb), 1.0)
    if abs(ma - mb) / scale < tie_margin or ma == mb:
        return "tie"
    return "A" if ma > mb else "B"


class RubricJudge(UncachedJudge):
    """Deterministic text measures instead of an LLM (a proxy; see the module docstring)."""

    name = "rubric"

    def __init__(self, spec, cache_path=None):
        super().__init__(spec)
        self.tie_margin = spec.settings.tie_margin

    def model_id(self) -> str:
        return f"rubric(tie_margin={self.tie_margin})"

    def check(self, prefs: Sequence[Preference]) -> None:
        for pref in prefs:
            _require(pref)

    def _judge_uncached(self, items: list[tuple[int, JudgeRequest]], deliver) -> None:
        for n, request in items:
            ma, mb = measure(request.pref, request.a), measure(request.pref, request.b)
            raw = json.dumps({"measure": measure_name(request.pref), "a": round(ma, 4), "b": round(mb, 4)})
            deliver(n, Judgment(verdict=compare(ma, mb, self.tie_margin), raw=raw))  # type: ignore[arg-type]
