"""The `openai` judge: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently (asyncio, at most `judge.openai.concurrency` in flight). The client's own
retries are off: we retry 429, 5xx, connection errors and time-outs ourselves, with exponential
backoff and full jitter, waiting what Retry-After asks when the server says, so every retry is
counted. An answer that names neither "Output (a)", "Output (b)" nor "TIE" is asked again up to
`parse_retries` times, then recorded as `invalid` (never as a tie). The API key is read from the
environment variable named by `judge.openai.api_key_env` when the client is made, and is never
stored: not in the cache, the summaries, the logs or the run directory.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time

from rlphf_cli.errors import InputError
from rlphf_cli.judges.base import BaseJudge, JudgeRequest, Judgment, parse_verdict

REASK = {
    "annotate": 'Your answer could not be read. Reply with exactly "Output (a)" or "Output (b)", and nothing else.',
    "evaluate": 'Your answer could not be read. Reply with exactly "Output (a)", "Output (b)" or "TIE", '
                "and nothing else.",
}
# Statuses worth a retry; anything else (400, 413, 422...) will not get better by asking again.
RETRY_STATUSES = {408, 409, 425, 429}
FATAL_STATUSES = {401: "the endpoint refused the API key", 403: "the API key may not use this model",
                  404: "model or endpoint not found"}


class _Failure(Exception):
    """No answer for one request after every retry."""


class _Fatal(Exception):
    """An answer no request will get (bad key, unknown model): stop the whole batch."""


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


class OpenAIJudge(BaseJudge):
    name = "openai"
    backoff_base = 0.5  # seconds before the first retry (doubled each time, capped), jittered
    backoff_cap = 30.0
    retry_after_cap = 300.0

    def __init__(self, spec, cache_path=None):
        super().__init__(spec, cache_path)
        self.cfg = spec.settings
        self.concurrency = self.cfg.concurrency
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
                "api_key_env": self.cfg.api_key_env, "concurrency": self.concurrency}

    def from_cache(self, record: dict) -> Judgment:
        # Re-parse the raw answers: a better parser applies to old answers without new requests.
        answers = record.get("answers") or [record.get("raw", "")]
        verdict = next((v for v in map(parse_verdict, answers) if v != "invalid"), "invalid")
        return Judgment(verdict=verdict, raw=answers[-1], answers=list(answers))

    def backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def _judge_uncached(self, items: list[tuple[int, JudgeRequest]], deliver) -> None:
        try:
            asyncio.run(self._run(items, deliver))
        except _Fatal as exc:
            raise InputError(f"openai judge at {self.cfg.base_url or 'api.openai.com'}: {exc}") from None

    async def _run(self, items, deliver) -> None:
        from openai import AsyncOpenAI

        # A local server needs no key; the client insists on a non-empty one.
        client = AsyncOpenAI(api_key=os.environ.get(self.cfg.api_key_env) or "unused", base_url=self.cfg.base_url,
                             timeout=self.cfg.timeout, max_retries=0)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(n: int, request: JudgeRequest) -> None:
            deliver(n, await self._ask(client, semaphore, request))

        tasks = [asyncio.ensure_future(one(n, request)) for n, request in items]
        try:
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

    async def _ask(self, client, semaphore, request: JudgeRequest) -> Judgment:
        messages = [{"role": "user", "content": self.templates.render(request)}]
        judgment = Judgment(verdict="invalid")
        for attempt in range(self.cfg.parse_retries + 1):
            try:
                text = await self._complete(client, semaphore, messages, judgment)
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

    def _answer_key(self, messages) -> str:
        from rlphf_cli.judges.cache import cache_key

        return cache_key(self.name, self.cfg.model, "answer", f"{self.cfg.temperature}:{self.cfg.max_tokens}",
                         json.dumps(messages, ensure_ascii=False), "", "", "")

    async def _complete(self, client, semaphore, messages, judgment: Judgment) -> str:
        """One answer from the endpoint. Every answer is cached the moment it arrives, before it is
        parsed: a run killed between an unreadable answer and its re-ask asks neither again."""
        key = self._answer_key(messages) if self.cache is not None else None
        if key is not None and "answer" in (self.cache.get(key) or {}):
            return self.cache.get(key)["answer"]
        text = await self._request(client, semaphore, messages, judgment)
        if key is not None:
            self.cache.put(key, {"backend": self.name, "model": self.cfg.model, "answer": text})
        return text

    async def _request(self, client, semaphore, messages, judgment: Judgment) -> str:
        import openai

        for attempt in range(self.cfg.max_retries + 1):
            wait = None
            try:
                async with semaphore:  # held for the request only, never while backing off
                    judgment.requests += 1
                    response = await client.chat.completions.create(
                        model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                        max_tokens=self.cfg.max_tokens,
                    )
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
            else:
                usage = getattr(response, "usage", None)
                if usage is not None:
                    judgment.prompt_tokens += usage.prompt_tokens or 0
                    judgment.completion_tokens += usage.completion_tokens or 0
                choices = response.choices or []
                return (choices[0].message.content or "") if choices else ""
            if attempt == self.cfg.max_retries:
                raise _Failure(f"{failure} ({attempt + 1} attempts)")
            self.stats.retries += 1
            await asyncio.sleep(min(wait, self.retry_after_cap) if wait is not None else self.backoff(attempt))
        raise AssertionError("unreachable")
