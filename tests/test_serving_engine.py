"""The transformers backend under failure and load: one request's failure is its own, a dead decode
thread is a 503 at once, merges run off the decode thread, a client that leaves frees its row, and
seeded answers are `rlphf generate`'s (tiny model, random LoRA policies: conftest.serve_run)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
import torch
from helpers import running_server, sse_lines
from openai import OpenAI
from typer.testing import CliRunner

from rlphf_cli.cli.main import app

PROMPTS = ["What is a volcano?", "Explain photosynthesis.", "Help me understand gravity.", "Why is the sky blue?"]
SOUPS = ["concise=0.7,friendly=0.3", "P1A+P2A+P3A", "informative", "base"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def client_of(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def answer(client: OpenAI, model: str, prompt: str, **kw) -> str:
    kw.setdefault("temperature", 0)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)
    return reply.choices[0].message.content


def health(url: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def wait_until(predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------------------------
# One request's failure is its own


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_failing_forward_fails_its_request_alone(served, monkeypatch, stage):
    """16 requests decode together; one request's forward raises (at its prefill, or at its third
    step, when the batch's KV cache has grown). That request gets an OpenAI error (an error event,
    then [DONE], in its stream); the other 15 give the answers they give alone, token for token."""
    client, backend = client_of(served.url), served.backend
    jobs = [(SOUPS[i % 4], PROMPTS[(i // 4) % 4]) for i in range(15)]
    alone = {job: answer(client, *job) for job in set(jobs)}
    poisoned = f"concise=0.{123 if stage == 'prefill' else 321},friendly=0.5"
    answer(client, poisoned, PROMPTS[0], max_tokens=1)  # merged and cached: its adapter is known
    bad = backend.soups[backend.policies.resolve(poisoned).key].name
    original, steps = backend._forward, {"n": 0}

    def forward(ids, mask, positions, adapters, cache):
        if bad in adapters:
            steps["n"] += cache is not None
            if stage == "prefill" or steps["n"] >= 3:
                raise RuntimeError("injected failure")
        return original(ids, mask, positions, adapters, cache)

    monkeypatch.setattr(backend, "_forward", forward)
    body = {"model": poisoned, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 40,
            "min_tokens": 40, "temperature": 0}
    with ThreadPoolExecutor(16) as pool:
        failing = pool.submit(sse_lines, served.url, body)
        together = list(pool.map(lambda job: answer(client, *job), jobs))
        status, events = failing.result()
    assert together == [alone[job] for job in jobs]
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert all("error" not in json.loads(e) for e in events[:-2])
    monkeypatch.setattr(backend, "_forward", original)
    assert wait_until(lambda: health(served.url)[1]["active"] == 0)
    assert answer(client, poisoned, PROMPTS[0], max_tokens=2)  # the soup itself is fine again


def test_a_dead_decode_thread_is_a_503_at_once_not_a_hang(serve_recipe):
    with running_server(serve_recipe) as served:
        client, backend = client_of(served.url), served.backend
        assert health(served.url)[0] == 200
        body = {"model": "concise", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 200,
                "min_tokens": 200}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(sse_lines, served.url, body)
            assert wait_until(lambda: health(served.url)[1]["active"] == 1)

            def broken():
                raise RuntimeError("the decode thread was killed")

            backend._take_pending = broken
            with backend._cond:
                backend._cond.notify_all()
            start = time.monotonic()
            status, events = running.result(timeout=10)
            assert time.monotonic() - start < 1
        assert status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "service_unavailable" and "killed" in error["message"]
        code, state = health(served.url)
        assert code == 503 and state["status"] == "unavailable" and "killed" in state["reason"]
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            answer(client, "concise", PROMPTS[0])
        assert caught.value.status_code == 503 and time.monotonic() - start < 1
        assert caught.value.body["code"] == "service_unavailable"


# --------------------------------------------------------------------------------------------
# Merges off the decode thread


def test_new_soups_are_merged_off_the_decode_thread_once_each(served, monkeypatch):
    """While a slow merge (1.5 s) runs on the worker, a running stream keeps its pace; the three
    requests for that soup wait for one merge; a soup written with other but equivalent weights
    is the same soup."""
    backend = served.backend
    original, merged = backend._merge, []

    def slow_merge(soup):
        merged.append(soup.key)
        time.sleep(1.5)
        return original(soup)

    monkeypatch.setattr(backend, "_merge", slow_merge)
    registry = backend.metrics.registry
    misses = registry.get_sample_value("rlphf_soup_cache_misses_total")
    host, port = urlparse(served.url).hostname, urlparse(served.url).port
    connection = http.client.HTTPConnection(host, port, timeout=60)
    body = {"model": "P2B", "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True,
            "max_tokens": 150, "min_tokens": 150, "temperature": 0}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    arrivals, client = [], client_of(served.url)
    with ThreadPoolExecutor(3) as pool:
        new = [pool.submit(answer, client, weights, PROMPTS[2], max_tokens=4)
               for weights in ("concise=0.41,friendly=0.59", "friendly=0.59,concise=0.41", "concise=41,friendly=59")]
        for line in response.fp:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
            if line.startswith(b"data: [DONE]"):
                break
        answers = [f.result() for f in new]
    connection.close()
    assert merged == ["P2A=0.41,P3A=0.59"] and len(set(answers)) == 1
    assert registry.get_sample_value("rlphf_soup_cache_misses_total") == misses + 3
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) > 20 and max(gaps) < 0.75, max(gaps)  # the stream never waited for the 1.5 s merge


# --------------------------------------------------------------------------------------------
# Clients that leave


def test_a_non_streaming_client_that_leaves_frees_its_row(served, monkeypatch):
    # Decoding slowed to >= 50 ms a token, so that 200 tokens (10 s) cannot finish before the
    # server notices the client left, however loaded the machine is.
    step = served.backend._decode_step

    def slow_step():
        time.sleep(0.05)
        step()

    monkeypatch.setattr(served.backend, "_decode_step", slow_step)
    _, before = health(served.url)
    body = json.dumps({"model": "P2B", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 200,
                       "min_tokens": 200}).encode()
    host, port = urlparse(served.url).hostname, urlparse(served.url).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: health(served.url)[1]["active"] == 1)
    assert wait_until(lambda: health(served.url)[1]["active"] == 0, timeout=5)  # not 200 tokens later
    assert health(served.url)[1]["cancelled"] == before["cancelled"] + 1


def test_stream_chunks_carry_usage_null_until_the_last(served):
    status, events = sse_lines(served.url, {"model": "concise", "max_tokens": 6, "temperature": 0,
                                            "stream_options": {"include_usage": True},
                                            "messages": [{"role": "user", "content": PROMPTS[0]}]})
    chunks = [json.loads(e) for e in events[:-1]]
    assert status == 200 and events[-1] == "[DONE]"
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


# --------------------------------------------------------------------------------------------
# The recipe's sampling settings: the same answers as `rlphf generate`


SETTINGS = ["seed=5", "generate.temperature=0.8", "generate.top_p=0.9", "generate.top_k=20",
            "generate.repetition_penalty=1.3", "generate.no_repeat_ngram_size=3", "generate.max_new_tokens=40"]


def test_seeded_samples_equal_rlphf_generate_with_the_recipes_settings(serve_run, served, tmp_path):
    from rlphf_cli.recipe import load_recipe

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "instruction": p}) + "\n" for i, p in enumerate(PROMPTS)))
    policy = serve_run / "policy"
    out = tmp_path / "generated.jsonl"
    result = CliRunner().invoke(app, [
        "generate", "--run-dir", str(serve_run), "--adapters", f"{policy}/P2A,{policy}/P3A", "--weights", "0.7,0.3",
        "--prefs", "P2A,P3A", "--prompts", str(prompts), "--out", str(out),
        *[arg for setting in SETTINGS for arg in ("--set", setting)]])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    recipe = load_recipe(None, SETTINGS, {"run_dir": str(serve_run)})
    with running_server(recipe) as server:
        client = client_of(server.url)
        with ThreadPoolExecutor(4) as pool:  # decoded together: each row keeps its own random stream
            got = list(pool.map(lambda p: answer(client, "concise=0.7,friendly=0.3", p, seed=5,
                                                 temperature=None), PROMPTS))
    assert got == expected
    # The settings matter: the fixture's server (the recipe's defaults) samples other answers.
    other = [answer(client_of(served.url), "concise=0.7,friendly=0.3", p, seed=5, temperature=0.8, top_p=0.9,
                    max_tokens=40) for p in PROMPTS]
    assert other != expected


def test_sampling_settings_reach_each_row(served):
    """Unit view of the per-row processing: a repetition penalty and an n-gram ban change the
    logits as transformers' processors do, for one row among others."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from rlphf_cli.serving.backend import Job, Sampling
    from rlphf_cli.serving.policies import Soup

    backend = served.backend
    sampling = Sampling(temperature=0, repetition_penalty=1.5, no_repeat_ngram_size=2, max_tokens=8)
    prompt = [5, 6, 7, 5, 9, 11, 12]
    row = backend._row(Job("x", prompt, Soup(), sampling), 0, lambda event: None)
    plain = backend._row(Job("y", prompt, Soup(), Sampling(temperature=0, max_tokens=8)), 0, lambda event: None)
    logits = torch.randn(2, len(backend.tokenizer))
    logits[0, 6] = 50.0  # 5 -> 6 already appeared: banned after a 5 although it is the best
    row.tokens, plain.tokens = [5], [5]
    row.record([5])
    ids = torch.tensor([prompt + [5]])
    expected = NoRepeatNGramLogitsProcessor(2)(ids, RepetitionPenaltyLogitsProcessor(1.5)(ids, logits[:1].clone()))
    tokens = backend._next_tokens([row, plain], logits.clone())
    assert tokens == [int(expected.argmax()), int(logits[1].argmax())] and tokens[0] != 6


def test_a_soup_that_cannot_be_prepared_fails_only_its_requests(served, monkeypatch):
    backend = served.backend

    def broken(soup):
        raise RuntimeError("merge exploded")

    monkeypatch.setattr(backend, "_merge", broken)
    client = client_of(served.url)
    with pytest.raises(openai.InternalServerError, match="merge exploded"):
        answer(client, "concise=0.33,friendly=0.67", PROMPTS[0], max_tokens=2)
    assert answer(client, "concise", PROMPTS[0], max_tokens=2)
    monkeypatch.undo()
    assert answer(client, "concise=0.33,friendly=0.67", PROMPTS[0], max_tokens=2)


def test_an_answer_that_takes_longer_than_the_watchdog_is_not_cut(served, monkeypatch):
    """The wait for events checks the decode thread's health every WATCHDOG_SECONDS; a slow but
    healthy backend is not declared dead."""
    from rlphf_cli.serving import engine

    monkeypatch.setattr(engine, "WATCHDOG_SECONDS", 0.01)
    original = served.backend._forward

    def slow(*args):
        time.sleep(0.05)
        return original(*args)

    monkeypatch.setattr(served.backend, "_forward", slow)
    assert answer(client_of(served.url), "concise", PROMPTS[0], max_tokens=3)
