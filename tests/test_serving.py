"""`rlphf serve`: the official openai client against a real server on a free port (tiny model,
LoRA policies with random non-zero factors, see conftest.serve_run)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from helpers import one_error_line
from openai import OpenAI
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.jobs import serve_spec

runner = CliRunner()
PROMPTS = ["What is a volcano?", "Explain photosynthesis.", "Help me understand gravity.",
           "Why is the sky blue?"]
SOUPS = ["concise=0.7,friendly=0.3", "P1A+P2A+P3A", "informative", "base"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: OpenAI, model: str, prompt: str, **kw) -> openai.types.chat.ChatCompletion:
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def answer(client: OpenAI, model: str, prompt: str, **kw) -> str:
    return ask(client, model, prompt, **kw).choices[0].message.content


def streamed(client: OpenAI, model: str, prompt: str, **kw) -> tuple[str, list]:
    kw.setdefault("temperature", 0)
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def call(method: str, url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    """A plain HTTP call (stdlib), for what the openai client will not send: (status, JSON body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(served) -> dict:
    return call("GET", f"{served.url}/health")[1]


# --------------------------------------------------------------------------------------------
# The API


def test_the_playground_has_a_favicon(served):
    with urllib.request.urlopen(f"{served.url}/favicon.ico", timeout=60) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "image/svg+xml"
        assert response.read().startswith(b"<svg")
    with urllib.request.urlopen(f"{served.url}/", timeout=60) as response:
        assert b'<link rel="icon" href="/favicon.ico"' in response.read()


def test_models_lists_base_policies_and_combinations(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "P1A", "P2A", "P2B", "P3A", "P1A+P2A+P3A", "P1A+P2B+P3A"]


def test_chat_answers_with_usage_and_the_soup_it_used(client, served):
    from rlphf_cli.prompting import instruction_with_preferences, render_prompt, text_ids
    from rlphf_cli.recipe import load_recipe

    reply = ask(client, "concise=0.7,friendly=0.3", PROMPTS[0])
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and reply.model == "concise=0.7,friendly=0.3"
    assert reply.model_extra["rlphf"] == {"soup": "P2A=0.7,P3A=0.3", "preferences": ["P2A", "P3A"]}
    # The prompt is the one rule's ids for the instruction with both preference prompts appended.
    prefs = load_recipe().preference_set().resolve("P2A,P3A")
    tokenizer = served.backend.tokenizer
    ids = text_ids(tokenizer, render_prompt(tokenizer, instruction_with_preferences(PROMPTS[0], prefs)))
    assert reply.usage.prompt_tokens == len(ids)
    assert 0 < reply.usage.completion_tokens <= 48
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # preference_prompts=false: the same soup, the bare instruction
    bare = ask(client, "concise=0.7,friendly=0.3", PROMPTS[0], extra_body={"preference_prompts": False})
    plain = text_ids(tokenizer, render_prompt(tokenizer, PROMPTS[0]))
    assert bare.usage.prompt_tokens == len(plain) and bare.model_extra["rlphf"]["preferences"] == []


@pytest.mark.parametrize("model", ["base", "concise", "concise=0.7,friendly=0.3"])
def test_stream_deltas_concatenate_to_the_answer(client, model):
    whole = ask(client, model, PROMPTS[1])
    text, chunks = streamed(client, model, PROMPTS[1], stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_soups_differ(client):
    """Otherwise the tests that compare soups' answers could not tell one soup from another."""
    with ThreadPoolExecutor(16) as pool:
        answers = {model: list(pool.map(lambda p, m=model: answer(client, m, p), PROMPTS)) for model in SOUPS}
    for i, one in enumerate(SOUPS):
        for other in SOUPS[i + 1:]:
            assert answers[one] != answers[other], (one, other)


def test_preferences_and_profiles_name_the_same_soup(client):
    by_model = answer(client, "concise=0.7,friendly=0.3", PROMPTS[2])
    assert answer(client, "soup", PROMPTS[2], extra_body={"preferences": {"friendly": 0.3, "concise": 0.7}}) == by_model
    assert answer(client, "soup", PROMPTS[2], user="alice") == by_model
    assert answer(client, "soup", PROMPTS[2], user="bob") == answer(client, "P1A+P2A+P3A", PROMPTS[2])
    # Order of members does not make another soup: catalog order, as `rlphf merge --prefs` does.
    assert answer(client, "friendly=0.3,concise=0.7", PROMPTS[2]) == by_model


def test_seed_n_and_stop(client):
    kw = {"temperature": 1.0, "max_tokens": 24}
    one = ask(client, "P2A", PROMPTS[3], seed=7, n=3, **kw)
    again = ask(client, "P2A", PROMPTS[3], seed=7, n=3, **kw)
    assert [c.message.content for c in one.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in one.choices}) > 1  # n samples, each its own
    assert [c.index for c in one.choices] == [0, 1, 2]
    other = ask(client, "P2A", PROMPTS[3], seed=8, n=3, **kw)
    assert [c.message.content for c in other.choices] != [c.message.content for c in one.choices]
    full = answer(client, "P2A", PROMPTS[3])
    word = full.split()[3]
    cut = ask(client, "P2A", PROMPTS[3], stop=[word])
    assert cut.choices[0].message.content == full[:full.index(word)].strip()
    assert cut.choices[0].finish_reason == "stop"
    text, _ = streamed(client, "P2A", PROMPTS[3], stop=word)
    assert text == cut.choices[0].message.content
    short = ask(client, "P2A", PROMPTS[3], max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_multi_turn_uses_the_chat_template_with_prefs_on_the_last_user_message(client, served):
    from rlphf_cli.prompting import text_ids
    from rlphf_cli.recipe import load_recipe

    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": PROMPTS[0]}]
    reply = client.chat.completions.create(model="concise", messages=messages, temperature=0, max_tokens=8)
    pref = load_recipe().preference_set().get("concise")
    tokenizer = served.backend.tokenizer
    expected = tokenizer.apply_chat_template(
        messages[:2] + [{"role": "user", "content": f"{PROMPTS[0]} {pref.prompt}"}], tokenize=False,
        add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(text_ids(tokenizer, expected))


# --------------------------------------------------------------------------------------------
# The same answers and tensors as the other commands


def test_greedy_soups_equal_rlphf_generate(client, served, tmp_path):
    """`rlphf generate --adapters ... --weights ... --prefs ... --temperature 0` merges the soup into
    the weights (merge_and_unload) and decodes a length-sorted, left-padded batch; the server keeps
    LoRA unmerged and decodes rows of many soups together. Same function of the same soup tensors,
    rounded in another order: on the tiny model the logits differ by at most 7e-6 (scale 19), and
    greedy answers were equal on 144 of 144 (48 evaluation prompts x 3 soups) when measured. An
    argmax tie broken by that rounding would show here as a failure, not be hidden."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "instruction": p}) + "\n" for i, p in enumerate(PROMPTS)))
    policy = served.run / "policy"
    cases = [("concise=0.7,friendly=0.3", [f"{policy}/P2A", f"{policy}/P3A"], "0.7,0.3", "P2A,P3A"),
             ("P1A+P2A+P3A", [f"{policy}/P1A", f"{policy}/P2A", f"{policy}/P3A"], None, "P1A,P2A,P3A")]
    for model, adapters, weights, prefs in cases:
        out = tmp_path / f"{model}.jsonl"
        args = ["generate", "--run-dir", str(served.run), "--adapters", ",".join(adapters), "--prefs", prefs,
                "--temperature", "0", "--max-new-tokens", "48", "--prompts", str(prompts), "--out", str(out)]
        result = runner.invoke(app, args + (["--weights", weights] if weights else []))
        assert result.exit_code == 0, result.output
        expected = [json.loads(line)["response"] for line in out.read_text().splitlines()]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # decoded in one batch on the server
            got = list(pool.map(lambda p, m=model: answer(client, m, p), PROMPTS))
        assert got == expected, model


def test_served_soup_is_the_tensors_rlphf_merge_writes(client, served, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    answer(client, "elementary=0.25,informative=0.5,friendly=0.25", PROMPTS[0], max_tokens=1)
    result = runner.invoke(app, ["merge", "--run-dir", str(served.run), "--prefs", "elementary,informative,friendly",
                                 "--weights", "0.25,0.5,0.25", "--out", str(tmp_path / "soup")])
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "soup" / "adapter_model.safetensors"))
    adapter = served.backend.soups["P1A=0.25,P2B=0.5,P3A=0.25"].name
    served_tensors = get_peft_model_state_dict(served.backend.model, adapter_name=adapter)
    assert set(served_tensors) == set(written)
    for key, tensor in written.items():
        assert torch.equal(served_tensors[key], tensor), key


# --------------------------------------------------------------------------------------------
# Batching, caching, disconnects


def test_16_concurrent_requests_over_4_soups_are_batched_and_correct(client, served):
    jobs = [(SOUPS[i % 4], PROMPTS[(i // 4) % 4]) for i in range(16)]
    alone = {job: answer(client, *job) for job in set(jobs)}  # one at a time
    before = health(served)["peak_batch"]
    served.backend.peak_batch = 0
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda job: answer(client, *job), jobs))
        assert together == [alone[job] for job in jobs]
        assert health(served)["peak_batch"] >= 8  # decoded together, not one after another
    finally:
        served.backend.peak_batch = max(before, served.backend.peak_batch)


def test_soups_are_cached_and_the_least_recently_used_dropped(client, served):
    from peft.utils import get_peft_model_state_dict

    from rlphf_cli.merging import merge_in_memory

    backend = served.backend
    deadline = time.monotonic() + 20
    while not backend._free and time.monotonic() < deadline:  # idle: it prepares spare adapters
        time.sleep(0.05)
    spares = [slot.name for slot in backend._free]
    assert spares
    answer(client, "concise=0.6,friendly=0.4", PROMPTS[0], max_tokens=1)
    assert backend.soups["P2A=0.6,P3A=0.4"].name in spares  # a new soup costs its merge, not add_adapter
    merges = backend.merges
    answer(client, "friendly=0.4,concise=0.6", PROMPTS[1], max_tokens=1)  # the same soup: no merge
    assert backend.merges == merges
    limit = backend.max_soups
    backend.max_soups = 2
    try:
        for w in (0.1, 0.2, 0.3):
            answer(client, f"concise={w},friendly={1 - w}", PROMPTS[0], max_tokens=1)
        assert list(backend.soups) == ["P2A=0.2,P3A=0.8", "P2A=0.3,P3A=0.7"]
        before_names = [slot.name for slot in backend.soups.values()]
        # --max-soups adapters in the model at most: an evicted soup's adapter took the next soup
        assert sorted(n for n in backend.model.peft_config if n.startswith("soup_")) == sorted(
            slot.name for slot in backend.soups.values())
        answer(client, "concise=0.1,friendly=0.9", PROMPTS[0], max_tokens=1)  # merged again, into a used slot
        reused = backend.soups["P2A=0.1,P3A=0.9"].name
        assert reused == before_names[0]  # the least recently used soup's adapter
        state, _ = merge_in_memory([backend.policies.inputs[n] for n in ("P2A", "P3A")],
                                   [backend.tensors[n] for n in ("P2A", "P3A")], [0.1, 0.9])
        held = get_peft_model_state_dict(backend.model, adapter_name=reused)
        assert set(held) == set(state) and all(torch.equal(held[k], state[k]) for k in state)
    finally:
        backend.max_soups = limit


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    before = health(served)["cancelled"]
    body = {"model": "P2B", "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True,
            "max_tokens": 200, "min_tokens": 200}
    host, port = served.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    chunks = 0
    while chunks < 3:
        chunks += response.fp.readline().startswith(b"data:")
    connection.close()  # gone after three chunks of 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = health(served)
        if status["cancelled"] > before and status["active"] == 0:
            break
        time.sleep(0.05)
    assert status["cancelled"] == before + 1 and status["active"] == 0, status
    tokens = served.backend.counters.completion_tokens  # and it still serves:
    status_code, _ = call("POST", f"{served.url}/v1/chat/completions",
                          {**body, "stream": False, "max_tokens": 4, "min_tokens": 0})
    assert status_code == 200 and served.backend.counters.completion_tokens > tokens


# --------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, never a 500 for user input, and the server keeps serving


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


@pytest.mark.parametrize("model, extra, status, code, param, words", [
    ("concize", {}, 404, "model_not_found", "model", ["no policy 'concize'", "did you mean 'concise'", "served: base"]),
    ("P1B", {}, 404, "model_not_found", "model", ["no policy 'P1B'", "P2A (concise)"]),
    ("concise=abc", {}, 400, None, "model", ["weight 'abc' of 'concise' is not a number"]),
    ("concise=nan,friendly=1", {}, 400, None, "model", ["weight 'nan' of 'concise' is not a finite number"]),
    ("concise=inf", {}, 400, None, "model", ["not a finite number"]),
    ("concise=0.5,friendly", {}, 400, None, "model", ["'friendly' has no weight"]),
    ("concise=0,friendly=0", {}, 400, None, "model", ["every weight is 0"]),
    ("concise=-0.5,friendly=1", {}, 400, None, "model", ["negative weight -0.5"]),
    ("soup", {}, 400, None, "model", ["needs 'preferences'"]),
    ("soup", {"user": "carol"}, 400, None, "user", ["user 'carol' has no profile", "alice, bob"]),
    ("concise", {"extra_body": {"preferences": {"concise": 1}}}, 400, None, "model", ["model' must be 'soup'"]),
    ("soup", {"extra_body": {"preferences": {"nope": 1}}}, 404, "model_not_found", "preferences", ["no policy 'nope'"]),
    ("soup", {"extra_body": {"preferences": {"concise": "high"}}}, 400, None, "preferences.concise", ["valid number"]),
    ("base", {"temperature": "hot"}, 400, None, "temperature", ["temperature"]),
    ("base", {"temperature": 3}, 400, None, "temperature", ["less than or equal to 2"]),
    ("base", {"n": 17}, 400, None, "n", ["at most 8 (--max-n"]),
    ("base", {"max_tokens": 250}, 400, "context_length_exceeded", "messages", ["context is 256 tokens"]),
    ("base", {"extra_body": {"top_k": 5}}, 400, None, "top_k", ["unknown field"]),
    ("base", {"presence_penalty": 1.0}, 400, None, "presence_penalty", ["not supported"]),
])
def test_errors_have_openai_shape_and_name_the_part(client, served, model, extra, status, code, param, words):
    got, body = error_of(lambda: ask(client, model, PROMPTS[0], **extra))
    assert got == status, body
    assert set(body) == {"message", "type", "param", "code"}  # the client hands over body["error"]
    assert body["type"] == "invalid_request_error" and body["code"] == code and body["param"] == param
    for word in words:
        assert word in body["message"], body["message"]
    assert answer(client, "concise", PROMPTS[0], max_tokens=2)  # still serving


def test_malformed_requests_and_routes(client, served):
    url = f"{served.url}/v1/chat/completions"
    status, body = call("POST", url, b'{"model": "base", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = call("POST", url, {"model": "base"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = call("POST", url, {"model": "base", "messages": [{"role": "system", "content": "x"}]})
    assert status == 400 and "no message with role 'user'" in body["error"]["message"]
    status, body = call("POST", url, {"model": "base", "messages": [{"role": "user", "content": "volcano " * 400}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = call("GET", f"{served.url}/v1/nowhere")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    assert answer(client, "base", PROMPTS[0], max_tokens=2)


# --------------------------------------------------------------------------------------------
# The command


def test_help_loads_no_heavy_library():
    """`rlphf serve --help` answers fast: it must not import torch, transformers or fastapi (a wall-time
    bound would fail on a loaded CI machine; what is imported is what makes it slow)."""
    code = ("import sys; from rlphf_cli.cli.main import main; sys.argv = ['rlphf', 'serve', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0 and "--max-soups" in done.stdout and "--backend" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


@pytest.mark.parametrize("args, words", [
    (["--policy", "nonsense"], "expected NAME=PATH"),
    (["--policy", "mine=/nonexistent"], "not a PEFT adapter folder"),
    (["--backend", "vlm"], "did you mean 'vllm'"),
    (["--backend", "vllm"], "vLLM is not installed"),
    (["--merge-method", "ties"], "needs a density"),
    (["--merge-method", "avg"], "unknown merge method 'avg'"),
])
def test_cli_errors_are_one_line(serve_run, monkeypatch, args, words):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM (import fails)
    result = runner.invoke(app, ["serve", "--run-dir", str(serve_run), "--port", "0", *args])
    assert words in one_error_line(result)


def test_cli_without_policies_names_the_command(tmp_path):
    result = runner.invoke(app, ["serve", "--run-dir", str(tmp_path), "--port", "0"])
    assert "rlphf train-policy --prefs all" in one_error_line(result)


@pytest.mark.parametrize("content, words", [
    ("users: [alice]", "users: Input should be a valid dictionary"),
    ("users: {alice: {concise: 0.7}}\nextra: 1", "extra: Extra inputs are not permitted"),
    ("users: {alice: {concize: 0.7}}", "users.alice"),
    ("users: {alice: {concise: .nan}}", "not a finite number"),
    ("users: {alice: 'P1A+P9Z'}", "users.alice 'P1A+P9Z': no policy 'P9Z'"),
    ("users: {alice: {concise: 1", "invalid YAML"),
])
def test_profile_errors_name_the_file_and_user(serve_run, tmp_path, content, words):
    from rlphf_cli.errors import InputError
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.serving.policies import PolicySet, load_profiles

    path = tmp_path / "profiles.yaml"
    path.write_text(content)
    policies = PolicySet.from_spec(serve_spec(load_recipe(None, [], {"run_dir": str(serve_run)})))
    with pytest.raises(InputError) as caught:
        load_profiles(path, policies)
    assert str(caught.value).startswith(f"{path}:") and words in str(caught.value), caught.value


def test_policies_that_cannot_be_merged_are_refused_per_request(serve_run, tiny_model, tmp_path):
    from lora_helpers import make_adapter

    from rlphf_cli.errors import InputError
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.serving.policies import PolicySet, UnknownModel

    wide = make_adapter(tiny_model, tmp_path / "wide", r=8, targets="all-linear", randomize=("lora_B",))
    policies = PolicySet.from_spec(serve_spec(load_recipe(None, [], {"run_dir": str(serve_run)}), [f"wide={wide}"]))
    assert policies.resolve("wide").names == ["wide"] and policies.resolve("wide").preferences == ()
    with pytest.raises(InputError, match="needs equal ranks, got r=8 vs r=4"):
        policies.resolve("concise=0.5,wide=0.5")
    with pytest.raises(UnknownModel, match="no policy 'P3B'"):
        policies.resolve("unfriendly")
    # Catalog order; zero weights dropped (as rlphf merge drops them; no prompt); the weights the average uses.
    soup = policies.resolve("friendly=1,elementary=2,concise=0")
    assert soup.members == (("P1A", 2 / 3), ("P3A", 1 / 3))
    assert policies.resolve("concise=7,friendly=3").key == policies.resolve("concise=0.7,friendly=0.3").key
    assert [p.id for p in soup.preferences] == ["P1A", "P3A"]


@pytest.mark.parametrize("spec, expected", [
    ("concise=0.7,friendly=0.3", [("P2A", 0.7), ("P3A", 0.3)]),
    ("P1A+concise+friendly", [("P1A", 1 / 3), ("P2A", 1 / 3), ("P3A", 1 / 3)]),
    ("concise, friendly", [("P2A", 0.5), ("P3A", 0.5)]),
    ({"expert": 2, "mine": 1}, [("P1B", 2.0), ("mine", 1.0)]),
    ("concise=abc", "--soup 'concise=abc': weight 'abc' of 'concise' is not a number"),
    ("concise=1,friendly", "--soup 'concise=1,friendly': 'friendly' has no weight"),
    ("concise=0", "every weight is 0"),
    ("concise+friendly=1", "a '+' combination has equal weights"),
    ("concise+P2A", "'P2A' appears twice"),
    ("P1A+P1B", [("P1A", 0.5), ("P1B", 0.5)]),  # one dimension's two ends: allowed (a note says so)
    ("=1", "a weight without a name"),
    ({"concise": float("inf")}, "weight 'inf' of 'concise' is not a finite number"),
])
def test_one_soup_syntax_for_generate_and_serve(spec, expected):
    from rlphf_cli.errors import InputError
    from rlphf_cli.generation import parse_soup
    from rlphf_cli.preferences import PreferenceSet

    if isinstance(expected, list):
        got = parse_soup(spec, PreferenceSet.catalog())
        assert [n for n, _ in got] == [n for n, _ in expected]
        assert [w for _, w in got] == pytest.approx([w for _, w in expected])
    else:
        with pytest.raises(InputError) as caught:
            parse_soup(spec, PreferenceSet.catalog())
        assert expected in str(caught.value)


def test_text_stream_holds_back_what_may_change():
    from rlphf_cli.serving.backend import TextStream

    text = TextStream(stop=["world"])
    sent = [text.update(t) for t in ("  Hello", "  Hello wor", "  Hello world, hi")]
    assert sent == ["Hello", "", ""] and text.stopped  # ' wor' might begin the stop string
    assert text.finish("  Hello world, hi") == ("", "Hello")
    text = TextStream()
    assert [text.update(t) for t in ("Caf", "Caf\ufffd", "Café  ", "Café  ok")] == ["Caf", "", "é", "  ok"]
    assert text.finish("Café  ok \n") == ("", "Café  ok")


def test_cli_serve_prints_url_policies_and_curl_and_stops_on_ctrl_c(serve_run, tmp_path):
    extra = shutil.copytree(serve_run / "policy" / "P2A", tmp_path / "mine")
    # Background jobs of a non-interactive shell (CI) ignore SIGINT; the child must not inherit that.
    proc = subprocess.Popen([sys.executable, "-m", "rlphf_cli", "serve", "--run-dir", str(serve_run), "--port", "0",
                             "--policy", f"mine={extra}", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "250"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "try: curl" in line:
                break
        text = "\n".join(lines)
        url = lines[0].split(": ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        for expected in ("policy P1A (elementary)", "policy P3A (friendly)", f"policy mine: {extra}",
                         f"playground: {url}/", "-H 'Content-Type: application/json'"):
            assert expected in text, text
        curl = lines[-1].split("try: ", 1)[1]
        reply = json.loads(subprocess.run(curl + " -s", shell=True, capture_output=True, text=True).stdout)
        assert reply["choices"][0]["message"]["content"]
        status, mine = call("POST", f"{url}/v1/chat/completions", {
            "model": "mine=0.5,P2A=0.5", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and mine["rlphf"]["soup"] == "P2A=0.5,mine=0.5"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130 and "interrupted" in proc.stderr.read()  # Ctrl-C, as every command
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_importing_serving_loads_no_torch_or_fastapi():
    code = ("import sys, rlphf_cli.serving, rlphf_cli.cli.serve; "
            "print(any(m in sys.modules for m in ('torch', 'fastapi', 'uvicorn')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_a_mix_of_one_dimensions_preferences_is_served(client):
    """Same-dimension mixes are allowed everywhere (a researcher sweeping concise/informative)."""
    assert answer(client, "concise+informative", "What is a volcano?", max_tokens=8)
    assert answer(client, "concise=0.25,informative=0.75", "What is a volcano?", max_tokens=8)


# --------------------------------------------------------------------------------------------
# Decoding-time mixing: extra_body={"compose": "logits"}


def test_greedy_mixes_equal_rlphf_generate_compose_logits(client, served, tmp_path):
    """The same mix (sum_i w_i log p_i of the policies' next-token distributions) served, in one
    batch with merged soups' rows, and written by `rlphf generate --compose logits`."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "instruction": p}) + "\n" for i, p in enumerate(PROMPTS)))
    policy = served.run / "policy"
    out = tmp_path / "mix.jsonl"
    result = runner.invoke(app, ["generate", "--run-dir", str(served.run), "--adapters", f"{policy}/P2A,{policy}/P3A",
                                 "--weights", "0.7,0.3", "--prefs", "P2A,P3A", "--compose", "logits",
                                 "--temperature", "0", "--max-new-tokens", "48", "--prompts", str(prompts),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    mix = {"extra_body": {"compose": "logits"}}
    jobs = [("concise=0.7,friendly=0.3", p, mix) for p in PROMPTS] + [("concise=0.7,friendly=0.3", p, {})
                                                                     for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:  # mixes and soups decoded in one batch
        got = list(pool.map(lambda job: answer(client, job[0], job[1], **job[2]), jobs))
    assert got[:len(PROMPTS)] == expected
    assert got[len(PROMPTS):] != expected  # the merged soup is another system
    response = ask(client, "concise=0.7,friendly=0.3", PROMPTS[0], **mix)
    assert response.model_extra["rlphf"]["soup"] == "mix:P2A=0.7,P3A=0.3"


def test_a_mix_with_all_weight_on_one_policy_is_that_policy(client):
    mix = {"extra_body": {"compose": "logits"}}
    assert answer(client, "concise=1,friendly=0", PROMPTS[1], **mix) == answer(client, "concise", PROMPTS[1])


def test_sampled_mixes_are_seeded_per_request_whatever_the_batch(client):
    kw = {"temperature": 1.0, "seed": 7, "max_tokens": 12, "extra_body": {"compose": "logits"}}
    alone = answer(client, "P1A+P2A+P3A", PROMPTS[2], **kw)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda m: answer(client, m, PROMPTS[2], **kw),
                                 ["P1A+P2A+P3A", "concise=0.7,friendly=0.3"] * 3))
    assert together[0::2] == [alone] * 3


def test_compose_errors_name_the_field(client):
    status, body = error_of(lambda: ask(client, "base", PROMPTS[0], extra_body={"compose": "logits"}))
    assert status == 400 and body["param"] == "compose" and "nothing to mix" in body["message"]
    status, body = error_of(lambda: ask(client, "concise=0.7,friendly=0.3", PROMPTS[0],
                                        extra_body={"compose": "tokens"}))
    assert status == 400 and "compose" in body["message"]
