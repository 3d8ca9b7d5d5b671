"""The `coin` judge: MEANINGLESS verdicts, for smoke runs (`rlphf run my.yaml --smoke`).

It renders the recipe's own judge template for every request, exactly as the `openai` and `hf`
judges would send it, then decides by a seeded hash of the rendered prompt: "Output (a)" or
"Output (b)" for annotation, either or a tie for evaluation. So a smoke run exercises the
preferences, the templates (a broken one fails the run) and every stage after the judge, offline
and in no time; but its labels, reward models, policies and win rates mean nothing, and the report
says so at the top. Never use it for results.
"""

from __future__ import annotations

import hashlib
import json

from rlphf_cli.judges.base import JudgeRequest, Judgment, UncachedJudge

VERDICTS = {"annotate": ("A", "B"), "evaluate": ("A", "B", "tie")}


class CoinJudge(UncachedJudge):
    name = "coin"

    def __init__(self, spec, cache_path=None):
        super().__init__(spec)
        self.seed = spec.settings.seed

    def model_id(self) -> str:
        return f"coin(seed={self.seed})"

    def _judge_uncached(self, items: list[tuple[int, JudgeRequest]], deliver) -> None:
        for n, request in items:
            prompt = self.templates.render(request)
            digest = hashlib.sha256(f"{self.seed}\0{prompt}".encode()).hexdigest()
            options = VERDICTS[request.use]
            verdict = options[int(digest[:8], 16) % len(options)]
            deliver(n, Judgment(verdict=verdict, raw=json.dumps({"coin": digest[:12], "prompt_chars": len(prompt)})))
