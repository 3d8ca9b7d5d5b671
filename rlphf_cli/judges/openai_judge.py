"""The `openai` judge: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently (asyncio, at most `judge.openai.concurrency` in flight). The client's own
retries are off: we retry 429, 5xx, connection errors and time-outs ourselves, with exponential
backoff and full jitter, waiting what Retry-After asks when the server says, so every retry is
counted. An answer that names neither "Output (a)", "Output (b)" nor "TIE" is asked again up to
`parse_retries` times, then recorded as `invalid` (never as a tie). The API key is read from the
environment variable named by `judge.openai.api_key_env` when the client is made, and is never
stored: not in the cache, the summaries, the logs or the run directory.

`batch_size` N > 1 asks up to N pairs of one preference and use in one request (the `<use>_batch`
template around N `batch_pair` blocks, numbered answers), as AlpacaFarm's "b5" annotators did for
the paper; a pair whose verdict is missing or unreadable is asked again on its own, with the
single-pair template. `mode: batch` sends the first requests through OpenAI's Batch API
(rlphf_cli.judges.openai_batch). A spending limit (`judge.max_cost`, rlphf_cli.judges.cost) is held
request by request before sending: once the next request could pass it, nothing more is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import random
import re
import time

from rlphf_cli.errors import InputError, SpendingLimitReached
from rlphf_cli.judges.base import BaseJudge, JudgeRequest, Judgment, Verdict, fill, parse_verdict
from rlphf_cli.judges.cost import RequestPlan, Spend, TokenRate, prompt_chars, usd

REASK = {
    "annotate": 'Your answer could not be read. Reply with exactly "Output (a)" or "Output (b)", and nothing else.',
    "evaluate": 'Your answer could not be read. Reply with exactly "Output (a)", "Output (b)" or "TIE", '
                "and nothing else.",
}
# Statuses worth a retry; anything else (400, 413, 422...) will not get better by asking again.
RETRY_STATUSES = {408, 409, 425, 429}
FATAL_STATUSES = {401: "the endpoint refused the API key", 403: "the API key may not use this model",
                  404: "model or endpoint not found"}
PLAN_SAMPLE = 64  # rendered prompts measured for a plan's token estimate
# "1. Output (a)", "**2.** TIE", "Pair 3: Output (b)": a numbered verdict of a batched answer.
_NUMBERED = re.compile(r"^[\s>*#-]*(?:pair\s*)?(\d+)\s*[.):-]\s*(.*\S)\s*$", re.I | re.M)


class _Failure(Exception):
    """No answer for one request after every retry."""


class _Fatal(Exception):
    """An answer no request will get (bad key, unknown model): stop the whole batch."""


class _OverBudget(Exception):
    """The spending limit refuses the next request: it is not sent."""


def retry_after_seconds(headers) -> float | None:
    """Seconds asked by `retry-after-ms` or `Retry-After` (seconds or an HTTP date), if any."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def parse_numbered(text: str, count: int) -> dict[int, tuple[Verdict, str]]:
    """{pair number: (verdict, its line)} of a batched answer; a number given two different verdicts
    is invalid, numbers outside 1..count are ignored."""
    found: dict[int, tuple[Verdict, str]] = {}
    for match in _NUMBERED.finditer(text):
        index = int(match.group(1))
        if not 1 <= index <= count:
            continue
        verdict = parse_verdict(match.group(2))
        if index in found and found[index][0] != verdict:
            verdict = "invalid"
        found[index] = (verdict, match.group(0).strip())
    return found


class OpenAIJudge(BaseJudge):
    name = "openai"
    backoff_base = 0.5  # seconds before the first retry (doubled each time, capped), jittered
    backoff_cap = 30.0
    retry_after_cap = 300.0

    def __init__(self, spec, cache_path=None):
        super().__init__(spec, cache_path)
        self.cfg = spec.settings
        self.concurrency = self.cfg.concurrency
        self.spend = Spend(usd=0.0 if self.cfg.price else None)  # what this judge paid in this process
        self.rate = TokenRate()
        self._rng = random.Random()
        if not os.environ.get(self.cfg.api_key_env) and self.cfg.base_url is None:
            raise InputError(
                f"the openai judge reads its API key from ${self.cfg.api_key_env}, which is not set "
                "(set it, or point judge.openai.base_url at a local OpenAI-compatible server)"
            )

    def model_id(self) -> str:
        return self.cfg.model

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.cfg.model, "base_url": self.cfg.base_url,
                "api_key_env": self.cfg.api_key_env, "concurrency": self.concurrency,
                "batch_size": self.cfg.batch_size, "mode": self.cfg.mode}

    @property
    def price(self):
        return self.cfg.price

    def framing(self, request: JudgeRequest) -> str:
        if self.cfg.batch_size == 1:
            return super().framing(request)
        # Asked among other pairs: another question than alone, so another verdict cache entry.
        return self.templates.text(request.pref, f"{request.use}_batch") + self.templates.text(request.pref, "batch_pair")

    def from_cache(self, record: dict) -> Judgment:
        # Re-parse the raw answers: a better parser applies to old answers without new requests.
        answers = record.get("answers") or [record.get("raw", "")]
        verdict = next((v for v in map(parse_verdict, answers) if v != "invalid"), "invalid")
        return Judgment(verdict=verdict, raw=answers[-1], answers=list(answers),
                        prompt_tokens=record.get("prompt_tokens", 0), completion_tokens=record.get("completion_tokens", 0))

    def backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    # ----------------------------------------------------------------------------------------
    # Requests: one pair each, or up to batch_size pairs of one preference and use

    def chunks(self, items: list[tuple[int, JudgeRequest]]) -> list[list[tuple[int, JudgeRequest]]]:
        """The items of each request, in order: up to batch_size pairs of one preference and use. A
        pair shown in both orders never has them in one request: the judge would see the swap."""
        size = self.cfg.batch_size
        if size == 1:
            return [[item] for item in items]
        groups: dict[tuple[str, str, bool], list[tuple[int, JudgeRequest]]] = {}
        shown: set[tuple[str, str, str, str, str]] = set()
        for item in items:
            request = item[1]
            swapped = (request.pref.id, request.use, request.instruction, request.b, request.a) in shown
            shown.add((request.pref.id, request.use, request.instruction, request.a, request.b))
            groups.setdefault((request.pref.id, request.use, swapped), []).append(item)
        return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]

    def messages(self, requests: list[JudgeRequest]) -> tuple[list[dict], int]:
        """The messages of one request asking for these pairs' verdicts, and its max_tokens."""
        if len(requests) == 1:
            return [{"role": "user", "content": self.templates.render(requests[0])}], self.cfg.max_tokens
        first = requests[0]
        block = self.templates.text(first.pref, "batch_pair")
        pairs = "".join(fill(block, {"index": str(i), "instruction": r.instruction, "output_a": r.a, "output_b": r.b})
                        for i, r in enumerate(requests, 1))
        text = fill(self.templates.text(first.pref, f"{first.use}_batch"),
                    {"criterion": first.pref.criterion, "count": str(len(requests)), "pairs": pairs})
        return [{"role": "user", "content": text}], self.cfg.max_tokens * len(requests)

    def chat_body(self, messages: list[dict], max_tokens: int) -> dict:
        return {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": max_tokens}

    def answer_key(self, messages: list[dict], max_tokens: int) -> str:
        from rlphf_cli.judges.cache import cache_key

        return cache_key(self.name, self.cfg.model, "answer", f"{self.cfg.temperature}:{max_tokens}",
                         json.dumps(messages, ensure_ascii=False), "", "", "")

    def answered(self, key: str) -> dict | None:
        record = self.cache.get(key) if self.cache is not None else None
        return record if record is not None and "answer" in record else None

    # ----------------------------------------------------------------------------------------
    # Cost

    def most(self, chars: int, max_tokens: int) -> float:
        """The highest a request can cost: its input estimated from its characters, its output at max_tokens."""
        return usd(self.price, self.rate.tokens_for(chars), max_tokens) or 0.0

    def store_answer(self, key: str | None, text: str, prompt_tokens: int, completion_tokens: int, chars: int,
                     held: float = 0.0) -> None:
        """An answer that was paid for: counted against the budget, cached the moment it arrives
        (before it is parsed: a run killed between an unreadable answer and its re-ask asks neither again)."""
        self.rate.add(chars, prompt_tokens)
        cost = usd(self.price, prompt_tokens, completion_tokens)
        self.spend.add(prompt_tokens, completion_tokens, cost)
        self.budget.settle(held, cost or 0.0)
        if key is not None and self.cache is not None:
            self.cache.put(key, {"backend": self.name, "model": self.cfg.model, "answer": text,
                                 "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "prompt_chars": chars})

    def _calibrate(self) -> tuple[float | None, bool]:
        """Measure tokens per character from the cached answers; return the mean output tokens per
        verdict of the cached verdicts (None when there are none)."""
        self.rate = TokenRate()
        outputs = []
        for record in self.cache.records() if self.cache is not None else ():
            if "answer" in record:
                self.rate.add(record.get("prompt_chars", 0), record.get("prompt_tokens", 0))
            elif record.get("verdict") and record.get("completion_tokens"):
                outputs.append(record["completion_tokens"])
        return (sum(outputs) / len(outputs) if outputs else None), self.rate.measured

    def plan(self, requests) -> RequestPlan:
        from rlphf_cli.judges.openai_batch import pending_ids

        cached, pending = self._split(requests)
        per_verdict, rate_measured = self._calibrate()
        items = [(n, requests[indices[0]]) for n, indices in enumerate(pending.values())]
        waiting = pending_ids(self.cache) if self.cfg.mode == "batch" and self.cache is not None else set()
        to_send = []
        for chunk in self.chunks(items):
            messages, max_tokens = self.messages([r for _, r in chunk])
            key = self.answer_key(messages, max_tokens)
            if not self.answered(key) and key not in waiting:  # a pending batch is collected, not paid again
                to_send.append((messages, max_tokens, len(chunk)))
        sample = random.Random(0).sample(to_send, min(PLAN_SAMPLE, len(to_send)))
        mean_chars = sum(prompt_chars(m) for m, _, _ in sample) / len(sample) if sample else 0.0
        input_tokens = self.rate.tokens_for(round(mean_chars * len(to_send)))
        output_tokens = round(sum(per_verdict * pairs if per_verdict is not None else max_tokens
                                  for _, max_tokens, pairs in to_send))
        return RequestPlan(judgments=len(requests), cached=len(cached), requests=len(to_send),
                           input_tokens=input_tokens, output_tokens=output_tokens,
                           usd=usd(self.price, input_tokens, output_tokens), rate_measured=rate_measured,
                           output_measured=per_verdict is not None, backend=self.name, price=self.price)

    # ----------------------------------------------------------------------------------------
    # Judging

    def _judge_uncached(self, items: list[tuple[int, JudgeRequest]], deliver) -> None:
        delivered = 0

        def counted(n: int, judgment: Judgment) -> None:
            nonlocal delivered
            delivered += 1
            deliver(n, judgment)

        self._calibrate()
        try:
            asyncio.run(self._run(items, counted))
        except (_Fatal, _Failure) as exc:
            raise InputError(f"openai judge at {self.cfg.base_url or 'api.openai.com'}: {exc}") from None
        if self.budget.stopped:
            where = f" (answers cached in {self.cache.path})" if self.cache is not None else ""
            raise SpendingLimitReached(
                f"spending limit: ${self.budget.spent:.4f} spent of the ${self.budget.limit:g} allowed (judge.max_cost, "
                f"--max-cost); {len(items) - delivered} of {len(items)} verdicts not asked{where}. Run the same command "
                "again to go on (cached answers are not paid again), with a higher limit if need be")

    async def _run(self, items, deliver) -> None:
        from openai import AsyncOpenAI

        # A local server needs no key; the client insists on a non-empty one.
        client = AsyncOpenAI(api_key=os.environ.get(self.cfg.api_key_env) or "unused", base_url=self.cfg.base_url,
                             timeout=self.cfg.timeout, max_retries=0)
        semaphore = asyncio.Semaphore(self.concurrency)
        chunks = self.chunks(items)

        async def one(chunk) -> None:
            with contextlib.suppress(_OverBudget):  # not asked: reported once every request in flight is in
                await self._ask_chunk(client, semaphore, chunk, deliver)

        tasks = []
        try:
            if self.cfg.mode == "batch":
                from rlphf_cli.judges.openai_batch import prefetch

                await prefetch(self, client, [self.messages([r for _, r in chunk]) for chunk in chunks])
            tasks = [asyncio.ensure_future(one(chunk)) for chunk in chunks]
            if tasks:
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in pending:
                    task.cancel()
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await client.close()

    async def _ask_chunk(self, client, semaphore, chunk, deliver) -> None:
        if len(chunk) == 1:
            n, request = chunk[0]
            deliver(n, await self._ask(client, semaphore, request))
            return
        messages, max_tokens = self.messages([r for _, r in chunk])
        whole = Judgment(verdict="invalid")
        try:
            verdicts = parse_numbered(await self._complete(client, semaphore, messages, whole, max_tokens), len(chunk))
        except _Failure:
            verdicts = {}  # no answer at all: every pair is asked on its own
        # The request's requests and tokens are shared out among its pairs.
        shares = [(whole.requests if k == 0 else 0, _share(whole.prompt_tokens, len(chunk), k),
                   _share(whole.completion_tokens, len(chunk), k)) for k in range(len(chunk))]

        async def alone(k: int, n: int, request: JudgeRequest) -> None:
            verdict, line = verdicts.get(k + 1, ("invalid", ""))
            if verdict != "invalid":
                judgment = Judgment(verdict=verdict, raw=line, answers=[line])
            else:  # missing or unreadable: asked again alone, with the single-pair template
                judgment = await self._ask(client, semaphore, request)
            judgment.requests += shares[k][0]
            judgment.prompt_tokens += shares[k][1]
            judgment.completion_tokens += shares[k][2]
            deliver(n, judgment)

        outcomes = await asyncio.gather(*(alone(k, n, r) for k, (n, r) in enumerate(chunk)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _ask(self, client, semaphore, request: JudgeRequest) -> Judgment:
        messages = self.messages([request])[0]
        judgment = Judgment(verdict="invalid")
        for attempt in range(self.cfg.parse_retries + 1):
            try:
                text = await self._complete(client, semaphore, messages, judgment, self.cfg.max_tokens)
            except _Failure as exc:
                judgment.error = str(exc)
                return judgment
            judgment.answers.append(text)
            judgment.raw = text
            judgment.verdict = parse_verdict(text)
            if judgment.verdict != "invalid":
                break
            if attempt < self.cfg.parse_retries:
                self.stats.reasks += 1
                messages = messages + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": REASK[request.use]}]
        return judgment

    async def _complete(self, client, semaphore, messages, judgment: Judgment, max_tokens: int) -> str:
        """One answer: from the cache (a killed run's, or the Batch API's), else from the endpoint
        once the spending limit allows its highest cost."""
        key = self.answer_key(messages, max_tokens) if self.cache is not None else None
        record = self.answered(key) if key is not None else None
        if record is not None:
            judgment.prompt_tokens += record.get("prompt_tokens", 0)
            judgment.completion_tokens += record.get("completion_tokens", 0)
            return record["answer"]
        chars = prompt_chars(messages)
        held: list[float] = []

        def admit() -> None:  # once a slot is free: requests waiting for one hold nothing
            amount = self.most(chars, max_tokens)
            if not self.budget.hold(amount):
                raise _OverBudget
            held.append(amount)

        try:
            response = await self.call(lambda: client.chat.completions.create(**self.chat_body(messages, max_tokens)),
                                        semaphore, judgment, admit)
        except BaseException:
            if held:
                self.budget.settle(held[0], 0.0)  # no answer, nothing billed
            raise
        usage = getattr(response, "usage", None)
        prompt_tokens, completion_tokens = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
        judgment.prompt_tokens += prompt_tokens
        judgment.completion_tokens += completion_tokens
        choices = response.choices or []
        text = (choices[0].message.content or "") if choices else ""
        self.store_answer(key, text, prompt_tokens, completion_tokens, chars, held[0])
        return text

    async def call(self, make, semaphore=None, judgment: Judgment | None = None, admit=None):
        """`await make()` (one API call: a chat completion, a file upload, a batch poll) with the judge's
        one retry loop: 429, 5xx, time-outs and connection errors are retried with backoff. `admit()`
        runs once a slot of the semaphore is free, before the first attempt (the spending limit)."""
        import openai

        for attempt in range(self.cfg.max_retries + 1):
            wait = None
            try:
                async with semaphore or contextlib.nullcontext():  # held for the request only, never while backing off
                    if admit is not None and attempt == 0:
                        admit()
                    if judgment is not None:
                        judgment.requests += 1
                    return await make()
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in FATAL_STATUSES:
                    raise _Fatal(f"HTTP {status}: {FATAL_STATUSES[status]} (key from ${self.cfg.api_key_env})") from None
                if status < 500 and status not in RETRY_STATUSES:
                    raise _Failure(f"HTTP {status}") from None
                failure = f"HTTP {status}"
                wait = retry_after_seconds(exc.response.headers)
            except openai.APITimeoutError:
                failure = f"time-out after {self.cfg.timeout:g} s"
            except openai.APIConnectionError:
                failure = "connection error"
            if attempt == self.cfg.max_retries:
                raise _Failure(f"{failure} ({attempt + 1} attempts)")
            self.stats.retries += 1
            await asyncio.sleep(min(wait, self.retry_after_cap) if wait is not None else self.backoff(attempt))
        raise AssertionError("unreachable")


def _share(total: int, parts: int, k: int) -> int:
    """Part k of `total` split into `parts` integers that sum to it."""
    return total // parts + (1 if k < total % parts else 0)
