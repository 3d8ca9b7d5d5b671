"""The openai judge through OpenAI's Batch API (`judge.openai.mode: batch`).

The first request of every pair (or group of pairs, with `batch_size`) is written as one JSONL
file, uploaded with the official client, and a batch is created and polled until it ends. Each
result line is matched by its `custom_id`, the answer's cache key, into the judge cache, where the
ordinary flow then finds every answer without a request. The batch's id goes into the cache the
moment the batch exists: a run killed while a batch is pending picks it up on rerun instead of
paying twice. What a batch did not answer (a failed line) and the re-asks of unreadable answers go
through the chat endpoint; every call, uploads and polls included, goes through the judge's one
retry loop.
"""

from __future__ import annotations

import asyncio
import json

from rlphf_cli.errors import InputError
from rlphf_cli.judges.cost import prompt_chars

ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def open_batches(cache) -> list[dict]:
    """The batches a judge created and has not collected yet (a killed run's)."""
    return [r for r in cache.records() if r.get("batch_id") and r.get("state") == "open"]


def pending_ids(cache) -> set[str]:
    return {key for record in open_batches(cache) for key in record["custom_ids"]}


async def prefetch(judge, client, wanted: list[tuple[list[dict], int]]) -> None:
    """Answers to `wanted` (messages, max_tokens) into the judge's cache through the Batch API: the
    open batches that hold some are collected, the rest go into one new batch (as many as the
    spending limit allows)."""
    cache = judge.cache
    if cache is None:
        raise InputError("judge.openai.mode batch keeps its batches in the judge cache, and this judge has none")
    asked = {judge.answer_key(messages, max_tokens): (messages, max_tokens) for messages, max_tokens in wanted}
    missing = [key for key in asked if not judge.answered(key)]
    for record in open_batches(cache):
        if set(missing) & set(record["custom_ids"]):
            await _collect(judge, client, record, asked)
            missing = [key for key in missing if not judge.answered(key)]
    lines, held = [], {}
    for key in missing:
        messages, max_tokens = asked[key]
        amount = judge.most(prompt_chars(messages), max_tokens)
        if not judge.budget.hold(amount):
            break  # the chat flow meets the same refusal and reports the limit
        held[key] = amount
        lines.append({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": judge.chat_body(messages, max_tokens)})
    if not lines:
        return
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    try:
        uploaded = await judge.call(lambda: client.files.create(file=("rlphf-judge-requests.jsonl", data),
                                                                purpose="batch"))
        batch = await judge.call(lambda: client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                                               completion_window="24h"))
    except BaseException:
        for amount in held.values():
            judge.budget.settle(amount, 0.0)
        raise
    record = {"backend": judge.name, "model": judge.model_id(), "batch_id": batch.id, "input_file_id": uploaded.id,
              "custom_ids": list(held), "state": "open"}
    cache.put(f"batch:{batch.id}", record)
    await _collect(judge, client, record, asked, held)


async def _collect(judge, client, record: dict, asked: dict, held: dict[str, float] | None = None) -> None:
    """Poll the batch until it ends, then cache every answer it holds; the batch is closed in the cache."""
    held = dict(held or {})
    batch = await judge.call(lambda: client.batches.retrieve(record["batch_id"]))
    while batch.status not in TERMINAL:
        await asyncio.sleep(judge.cfg.poll_interval)
        batch = await judge.call(lambda: client.batches.retrieve(record["batch_id"]))
    ours = set(record["custom_ids"])
    if batch.output_file_id:  # an expired or cancelled batch keeps what it answered
        content = await judge.call(lambda: client.files.content(batch.output_file_id))
        for line in content.text.splitlines():
            result = json.loads(line) if line.strip() else {}
            key, response = result.get("custom_id"), result.get("response") or {}
            if key not in ours or response.get("status_code") != 200:
                continue  # failed lines are asked through the chat endpoint
            body = response.get("body") or {}
            choices, usage = body.get("choices") or [], body.get("usage") or {}
            text = ((choices[0].get("message") or {}).get("content") or "") if choices else ""
            messages = asked.get(key, ([], 0))[0]
            judge.store_answer(key, text, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0,
                               prompt_chars(messages), held.pop(key, 0.0))
    for amount in held.values():
        judge.budget.settle(amount, 0.0)  # not answered, not billed
    judge.cache.put(f"batch:{record['batch_id']}", {**record, "state": "closed", "status": batch.status})
