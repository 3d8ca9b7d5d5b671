"""What the judging commands share about cost: --max-cost, --dry-run, and how a plan of requests reads."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

MaxCostOption = Annotated[
    Optional[float], typer.Option("--max-cost", min=0, help="Stop sending judge requests before the spend (counted "
                                  "from the answers' usage at judge.openai.price) would pass this many USD; "
                                  "answers so far stay cached (default: judge.max_cost).", show_default=False)
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print how many requests the judge would send after its cache, with "
                       "their expected tokens and cost; send and write nothing.")
]


def plan_line(what: str, plan) -> str:
    """One line: how many requests `what` sends, their tokens and cost (a judges.cost.RequestPlan)."""
    head = f"{what}: {plan.judgments:,} verdicts, {plan.cached:,} cached"
    if not plan.requests:
        return head + (f"; the {plan.backend} judge sends no paid requests" if plan.judgments > plan.cached
                       else "; nothing to send")
    rate = "measured from cached answers" if plan.rate_measured else "at 4 characters a token"
    output = "" if plan.output_measured else "at most "
    text = (f"{head}; {plan.requests:,} requests to send: about {plan.input_tokens:,} input tokens ({rate}) and "
            f"{output}{plan.output_tokens:,} output tokens")
    if plan.usd is None:
        text += "; cost unknown: no judge price (set judge.openai.price.input and .output, USD per million tokens)"
    else:
        text += f"; {output or 'about '}${plan.usd:,.4f} at ${plan.price.input:g} / ${plan.price.output:g} per million tokens"
    if plan.estimated:
        text += " (inputs not made yet: counted with every response at its longest)"
    return text
