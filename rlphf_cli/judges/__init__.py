"""Pairwise judges: which of two responses better fits one preference.

Backends, by name (`JUDGES`): `rubric` (offline text measures, a proxy), `openai` (any
OpenAI-compatible chat endpoint), `hf` (a local causal LM's log-probabilities of the answers),
`coin` (a seeded hash of the rendered prompt: meaningless, for smoke runs).
Backend modules are imported on first use, so importing this package stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rlphf_cli.judges.base import Judge, JudgeRequest, JudgeStats, Judgment, parse_verdict
from rlphf_cli.preferences import Preference
from rlphf_cli.registry import Registry

# The single, preference-agnostic criterion of the traditional RLHF baseline (annotations/general.jsonl
# -> rm/general -> policy/rlhf; the id matches rlphf_cli.training.GENERAL). Judged with the generic
# templates by the LLM judges, and by an "overall quality" proxy by the rubric.
GENERAL_PREFERENCE = Preference(
    "general", "general", "general", "",
    "Which response is better overall: more helpful, accurate and appropriate to the instruction?",
)

# The backend whose verdicts mean nothing (smoke runs); reports say so loudly when it was used.
COIN = "coin"

JudgeFactory = Callable[..., Judge]
JUDGES: Registry[JudgeFactory] = Registry("judge")


@JUDGES.register("rubric")
def _rubric(recipe, cache_path=None) -> Judge:
    from rlphf_cli.judges.rubric import RubricJudge

    return RubricJudge(recipe, cache_path)


@JUDGES.register("openai")
def _openai(recipe, cache_path=None) -> Judge:
    from rlphf_cli.judges.openai_judge import OpenAIJudge

    return OpenAIJudge(recipe, cache_path)


@JUDGES.register("hf")
def _hf(recipe, cache_path=None) -> Judge:
    from rlphf_cli.judges.hf_judge import HFJudge

    return HFJudge(recipe, cache_path)


@JUDGES.register(COIN)
def _coin(recipe, cache_path=None) -> Judge:
    from rlphf_cli.judges.coin import CoinJudge

    return CoinJudge(recipe, cache_path)


def get_judge(name: str | None, recipe, cache_path: str | Path | None = None) -> Judge:
    """A judge backend configured from `recipe.judge.<name>` (default: `recipe.judge.backend`).

    `cache_path`: the JSONL verdict cache; annotate and judge attach one next to their output
    when none is given."""
    return JUDGES.get(name or recipe.judge.backend)(recipe, cache_path)


__all__ = ["COIN", "GENERAL_PREFERENCE", "JUDGES", "Judge", "JudgeRequest", "JudgeStats", "Judgment", "get_judge", "parse_verdict"]
