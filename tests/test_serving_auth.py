"""`rlphf serve` in front of users: API keys, the limits of one request, the bounded queue, the
requests in flight per key, /metrics and the access log, with the official openai client on a
free port (tiny model, random LoRA policies: conftest.serve_run)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from helpers import one_error_line, running_server, sse_lines
from openai import OpenAI
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.specs import ServeLimits

KEYS = ("sk-first-0123456789", "sk-second-9876543210")
PROMPT = "What is a volcano?"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def keyed(serve_recipe):
    """A server that needs a key, logs requests, and allows one request in flight per key."""
    limits = ServeLimits(max_body_bytes=20_000, max_requests_per_key=1)
    with running_server(serve_recipe, limits, api_keys=KEYS, log_requests=True) as server:
        yield server


def client_of(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(client: OpenAI, model: str = "concise", **kw):
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                          temperature=0, **kw)


def get(url: str, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --------------------------------------------------------------------------------------------
# Keys


def test_keys_come_from_flags_and_the_environment():
    from rlphf_cli.errors import InputError
    from rlphf_cli.serving.auth import KeyChecker, api_keys

    assert api_keys(["a-key"], {"RLPHF_API_KEY": "b-key, c-key,,a-key"}) == ("a-key", "b-key", "c-key")
    assert api_keys([], {}) == ()
    with pytest.raises(InputError, match="whitespace"):
        api_keys(["two words"], {})
    checker = KeyChecker(["a-key", "b-key"])
    assert [checker.identify(h) for h in ("Bearer b-key", "bearer a-key", "Bearer c-key", "b-key", None, "Bearer ")] \
        == [2, 1, None, None, None, None]
    assert not KeyChecker([]).required


@pytest.mark.parametrize("host, keys, no_auth, error", [
    ("127.0.0.1", (), False, None),
    ("localhost", (), False, None),
    ("::1", (), False, None),
    ("0.0.0.0", (), False, "reachable from other machines without an API key"),
    ("0.0.0.0", ("k-123",), False, None),
    ("0.0.0.0", (), True, None),
    ("0.0.0.0", ("k-123",), True, "--no-auth with --api-key"),
])
def test_listening_beyond_loopback_needs_a_key_or_no_auth(host, keys, no_auth, error):
    from rlphf_cli.errors import InputError
    from rlphf_cli.serving.auth import check_exposure

    if error is None:
        check_exposure(host, keys, no_auth)
    else:
        with pytest.raises(InputError, match=error):
            check_exposure(host, keys, no_auth)


def test_cli_refuses_an_open_non_loopback_address_before_loading(serve_run, monkeypatch):
    monkeypatch.delenv("RLPHF_API_KEY", raising=False)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["serve", "--run-dir", str(serve_run), "--host", "0.0.0.0", "--port", "0"])
    assert "--host 0.0.0.0: reachable from other machines without an API key" in one_error_line(result)
    assert time.monotonic() - start < 5  # nothing was loaded
    result = CliRunner().invoke(app, ["serve", "--run-dir", str(serve_run), "--max-queue", "0"])
    assert result.exit_code == 2 and "--max-queue" in result.output


def test_v1_routes_need_a_key_health_and_metrics_do_not(keyed):
    for key in KEYS:  # either key works
        assert ask(client_of(keyed.url, key)).choices[0].message.content
        assert [m.id for m in client_of(keyed.url, key).models.list().data][0] == "base"
    for client in (client_of(keyed.url, "sk-wrong"), client_of(keyed.url, KEYS[0][:-1])):
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(client)
        assert caught.value.status_code == 401
        assert caught.value.body["code"] == "invalid_api_key" and caught.value.body["type"] == "invalid_request_error"
        assert "Incorrect API key" in caught.value.body["message"]
    status, body = get(f"{keyed.url}/v1/models")  # no Authorization header at all
    assert status == 401 and "didn't provide an API key" in json.loads(body)["error"]["message"]
    status, body = get(f"{keyed.url}/v1/chat/completions")  # the key is checked before anything else
    assert status == 401
    assert get(f"{keyed.url}/health")[0] == 200 and get(f"{keyed.url}/metrics")[0] == 200
    assert get(f"{keyed.url}/")[0] == 200


def access_lines(caplog, count: int) -> list[str]:
    """The access log's lines once there are `count`: a line is written when the response has been
    sent, so the client can hold its answer a moment before the line exists."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "rlphf.serve.access"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_keys_never_reach_logs_or_error_messages(keyed, caplog):
    with caplog.at_level(logging.INFO, logger="rlphf.serve"):
        ask(client_of(keyed.url, KEYS[1]))
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(client_of(keyed.url, "sk-a-guess-0000"))
        with pytest.raises(openai.NotFoundError):
            ask(client_of(keyed.url, KEYS[0]), model="nope")
        lines = access_lines(caplog, 3)
    assert len(lines) == 3
    assert "key#2" in lines[0] and '"POST /v1/chat/completions" 200' in lines[0] and "prompt_tokens=" in lines[0]
    assert "ttft=" in lines[0] and "completion_tokens=" in lines[0]
    assert " 401 " in lines[1] and " 404 " in lines[2]
    text = "\n".join(r.getMessage() for r in caplog.records) + json.dumps(caught.value.body)
    for secret in (*KEYS, "sk-a-guess-0000"):
        assert secret not in text
    assert PROMPT not in "\n".join(lines)  # no prompt text unless --log-prompts


def test_log_prompts_adds_the_last_user_message(serve_recipe, caplog):
    with running_server(serve_recipe, log_requests=True, log_prompts=True) as server:
        with caplog.at_level(logging.INFO, logger="rlphf.serve.access"):
            ask(client_of(server.url))
            lines = access_lines(caplog, 1)
    assert len(lines) == 1 and f'prompt="{PROMPT}"' in lines[0]


def test_a_body_over_the_limit_is_a_413(keyed):
    client = client_of(keyed.url, KEYS[0])
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x" * 30_000}])
    assert caught.value.status_code == 413 and "--max-body-bytes" in caught.value.body["message"]
    assert ask(client).choices[0].message.content  # still serving


def test_requests_in_flight_per_key_are_bounded(keyed):
    body = {"model": "P2B", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 120, "min_tokens": 120}
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(sse_lines, keyed.url, body, {"Authorization": f"Bearer {KEYS[0]}"})
        deadline = time.monotonic() + 20
        while not json.loads(get(f"{keyed.url}/health")[1])["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client_of(keyed.url, KEYS[0]))
        assert "--max-requests-per-key 1" in caught.value.body["message"]
        assert caught.value.response.headers["retry-after"] == "1"
        assert ask(client_of(keyed.url, KEYS[1])).choices[0].message.content  # another key is not held up
        assert long.result()[1][-1] == "[DONE]"
    assert ask(client_of(keyed.url, KEYS[0])).choices[0].message.content


# --------------------------------------------------------------------------------------------
# The limits of one request


@pytest.mark.parametrize("kw, param, words", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "5 stop sequences; at most 4 (--max-stop)"),
    ({"stop": ["x" * 65]}, "stop", "65 characters; at most 64 (--max-stop-chars)"),
    ({"max_tokens": 5000}, "max_tokens", "max_tokens: 5000; this server allows at most 2048 (--max-tokens-limit)"),
    ({"n": 9}, "n", "at most 8 (--max-n"),
    ({"model": ",".join(f"p{i}=1" for i in range(100))}, "model",
     "a soup of 100 policies; this server merges at most 8 (--max-soup-members)"),
    ({"model": "soup", "extra_body": {"preferences": {f"p{i}": 1 for i in range(9)}}}, "preferences",
     "at most 8 (--max-soup-members)"),
])
def test_each_limit_is_an_openai_400_naming_it(served, kw, param, words):
    client = client_of(served.url)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, **{"model": "concise", **kw})
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    assert words in body["message"], body["message"]


def test_prompt_tokens_are_bounded(serve_recipe):
    with running_server(serve_recipe, ServeLimits(max_prompt_tokens=20)) as server:
        client = client_of(server.url)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "volcano " * 30}])
        assert caught.value.body["code"] == "context_length_exceeded"
        assert "at most 20 (--max-prompt-tokens)" in caught.value.body["message"]
        reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}],
                                               extra_body={"preference_prompts": False}, max_tokens=2)
        assert reply.usage.prompt_tokens <= 20


def test_a_flood_beyond_the_queue_gets_429s_then_normal_answers(serve_recipe):
    """Two rows decode and two requests wait; of 12 long requests at once, the rest are told to
    retry (429, Retry-After) at once, and the server answers normally afterwards."""
    with running_server(serve_recipe, ServeLimits(max_queue=2), max_batch=2) as server:
        client = client_of(server.url)

        def one(i: int):
            try:
                reply = ask(client, "concise", max_tokens=60, extra_body={"min_tokens": 60})
                return reply.usage.completion_tokens
            except openai.RateLimitError as exc:
                return exc

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(one, range(12)))
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        assert len(refused) >= 6 and all(o == 60 for o in outcomes if not isinstance(o, Exception))
        assert refused[0].response.headers["retry-after"] == "1"
        assert "--max-queue 2" in refused[0].body["message"] and refused[0].body["code"] == "rate_limit_exceeded"
        assert ask(client).choices[0].message.content
        assert json.loads(get(f"{server.url}/health")[1])["queued"] == 0


# --------------------------------------------------------------------------------------------
# /metrics


def test_metrics_in_prometheus_text_format(served):
    from prometheus_client.parser import text_string_to_metric_families

    client = client_of(served.url)
    ask(client, "concise=0.15,friendly=0.85")  # a new soup: a miss and a merge
    ask(client, "concise=0.15,friendly=0.85")  # the same: a hit
    with pytest.raises(openai.BadRequestError):
        ask(client, n=100)
    status, text = get(f"{served.url}/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("rlphf_requests_total", status="200") >= 2 and value("rlphf_requests_total", status="400") >= 1
    assert value("rlphf_soup_cache_hits_total") >= 1 and value("rlphf_soup_cache_misses_total") >= 1
    assert value("rlphf_soup_merge_seconds_count") >= 1
    assert value("rlphf_prompt_tokens_total") > 0 and value("rlphf_generation_tokens_total") > 0
    assert value("rlphf_time_to_first_token_seconds_count") >= 2 and value("rlphf_e2e_request_latency_seconds_count") >= 2
    assert value("rlphf_requests_waiting") == 0 and value("rlphf_running_rows") == 0
