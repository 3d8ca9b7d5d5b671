"""Pairwise judges: which of two responses better fits one preference.

Backends, by name (`JUDGES`): `rubric` (offline text measures, a proxy), `openai` (any
OpenAI-compatible chat endpoint), `hf` (a local causal LM's log-probabilities of the answers),
`coin` (a seeded hash of the rendered prompt: meaningless, for smoke runs).
Backend modules are imported on first use, so importing this package stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from rlphf_cli.judges.base import Judge, JudgeRequest, JudgeStats, Judgment, TemplateSet, parse_verdict
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

@dataclass(frozen=True)
class JudgeBackend:
    """A judge backend by name: where its class lives, and whether it renders prompt templates
    (then their texts are part of its spec, and of what its verdicts depend on)."""

    name: str
    module: str
    class_name: str
    uses_templates: bool
    priced: bool = False  # its requests are paid: its settings hold a `price`, and judge.max_cost applies

    def create(self, spec, cache_path: str | Path | None = None) -> Judge:
        return getattr(importlib.import_module(self.module), self.class_name)(spec, cache_path)


JUDGES: Registry[JudgeBackend] = Registry("judge")
for _backend in (
    JudgeBackend("rubric", "rlphf_cli.judges.rubric", "RubricJudge", uses_templates=False),
    JudgeBackend("openai", "rlphf_cli.judges.openai_judge", "OpenAIJudge", uses_templates=True, priced=True),
    JudgeBackend("hf", "rlphf_cli.judges.hf_judge", "HFJudge", uses_templates=True),
    JudgeBackend(COIN, "rlphf_cli.judges.coin", "CoinJudge", uses_templates=True),
):
    JUDGES.register(_backend.name)(_backend)


def get_judge(spec, cache_path: str | Path | None = None, budget=None) -> Judge:
    """The judge a specs.JudgeSpec describes (backend, its settings, its templates).

    `cache_path`: the JSONL verdict cache; annotate and judge attach one next to their output
    when none is given. `budget`: a cost.Budget the judges of one command share (default: the
    spec's own spending limit)."""
    judge = JUDGES.get(spec.backend).create(spec, cache_path)
    if budget is not None:
        judge.budget = budget
    return judge


__all__ = ["COIN", "GENERAL_PREFERENCE", "JUDGES", "Judge", "JudgeBackend", "JudgeRequest", "JudgeStats", "Judgment",
           "TemplateSet", "get_judge", "parse_verdict"]
