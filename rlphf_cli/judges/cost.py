"""What judging costs: prices, a spending limit that a command's judges share, and the plan of the
requests a judge would send (`--dry-run`).

Prices come from the recipe (`judge.openai.price`, USD per million input and output tokens); none
ships. Spend is counted from the `usage` of the answers. Before it is sent, a request holds what it
can cost at most (its input tokens estimated from its characters, its output at `max_tokens`), so
the limit is never passed by the requests in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

# OpenAI's rule of thumb for English text, used until answers' usage gives the measured rate.
CHARS_PER_TOKEN = 4.0


def prompt_chars(messages: list[dict]) -> int:
    """The characters of a chat request's messages: what its input tokens are estimated from."""
    return sum(len(str(m.get("content", ""))) for m in messages)


def usd(price, prompt_tokens: int, completion_tokens: int) -> float | None:
    """The cost of tokens at `price` (a recipe PriceSection), or None without a price."""
    if price is None:
        return None
    return (price.input * prompt_tokens + price.output * completion_tokens) / 1e6


def cost_record(judgments, price) -> dict:
    """The tokens and USD of the answers behind `judgments` (cached ones included, whenever they were
    asked), and the price they are counted at."""
    prompt_tokens = sum(j.prompt_tokens for j in judgments)
    completion_tokens = sum(j.completion_tokens for j in judgments)
    cost = usd(price, prompt_tokens, completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "usd": None if cost is None else round(cost, 6),
            "price": None if price is None else {"input": price.input, "output": price.output}}


class Budget:
    """A spending limit in USD (None: no limit), shared by every judge of one command, so the stages of
    `rlphf run` draw on one limit. After the first refusal every later request is refused too: a
    command stops sending, it does not pick the cheaper requests that still fit."""

    def __init__(self, limit: float | None = None):
        self.limit = limit
        self.spent = 0.0
        self.held = 0.0
        self.refused = 0

    def hold(self, amount: float) -> bool:
        if self.limit is not None and (self.refused or self.spent + self.held + amount > self.limit):
            self.refused += 1
            return False
        self.held += amount
        return True

    def settle(self, held: float, amount: float) -> None:
        self.held -= held
        self.spent += amount

    @property
    def stopped(self) -> bool:
        return self.refused > 0


class TokenRate:
    """Input tokens per character of prompt: measured from answered requests where there are some,
    else CHARS_PER_TOKEN."""

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0

    def add(self, chars: int, tokens: int) -> None:
        if chars > 0 and tokens > 0:
            self.chars += chars
            self.tokens += tokens

    @property
    def measured(self) -> bool:
        return self.chars > 0

    def tokens_for(self, chars: int) -> int:
        return math.ceil(chars * (self.tokens / self.chars if self.chars else 1 / CHARS_PER_TOKEN))


@dataclass
class RequestPlan:
    """What a judge would send for a set of judgments, after its cache."""

    judgments: int = 0  # verdicts wanted
    cached: int = 0  # of those, already in the cache
    requests: int = 0  # requests to send (several pairs in one when batched)
    input_tokens: int = 0  # expected, from a sample of the rendered prompts
    output_tokens: int = 0  # at most (max_tokens each) unless `output_measured`
    usd: float | None = 0.0  # None: requests with no price to count them at
    rate_measured: bool = False  # tokens per character measured from cached answers (else 4 per token)
    output_measured: bool = False  # output tokens from the mean of cached answers (else max_tokens)
    estimated: bool = False  # the inputs are not made yet: stand-ins with responses at their longest
    backend: str = ""
    price: Any = None  # the recipe PriceSection the cost is counted at

    def __add__(self, other: RequestPlan) -> RequestPlan:
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name in ("judgments", "cached", "requests", "input_tokens", "output_tokens")}
        # How the estimates were made is said of the plans that send something.
        sending = [p for p in (self, other) if p.requests] or [self, other]
        return RequestPlan(**counts, usd=None if self.usd is None or other.usd is None else self.usd + other.usd,
                           rate_measured=all(p.rate_measured for p in sending),
                           output_measured=all(p.output_measured for p in sending),
                           estimated=self.estimated or other.estimated, backend=self.backend or other.backend,
                           price=self.price or other.price)


@dataclass
class Spend:
    """What a judge paid in this process: answered requests, their tokens, and USD (None: no price)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float | None = 0.0

    def add(self, prompt_tokens: int, completion_tokens: int, cost: float | None) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.usd = None if self.usd is None or cost is None else self.usd + cost

    def to_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "usd": None if self.usd is None else round(self.usd, 6)}
