"""Judges (rlphf_cli.judges): verdict parsing, templates, the rubric proxy, the coin judge, the cache, the
openai backend against a local fake server with injected faults, the hf backend, win rates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PIRATE, PIRATE_TEMPLATE

from rlphf_cli.errors import InputError
from rlphf_cli.evaluation.winrate import bootstrap_ci, summarize, win_rate
from rlphf_cli.judges import JUDGES, JudgeRequest, parse_verdict
from rlphf_cli.judges.base import TemplateSet, render_template, shipped_templates_dir
from rlphf_cli.judges.cache import JudgeCache
from rlphf_cli.judges.rubric import compare, measure
from rlphf_cli.preferences import Preference, PreferenceSet
from rlphf_cli.recipe import Recipe, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from helpers import judge_for, recipe_with  # noqa: E402

PREFS = PreferenceSet.catalog()
KEY = "sk-test-THIS-MUST-NEVER-BE-WRITTEN-0123456789"
CUSTOM = Preference("P9X", "pirate", "voice", "Talk like a pirate.", "Which response sounds more like a pirate?")

SIMPLE = "Plants use sunlight to make food. They take in water and air. It is like cooking with light."
EXPERT = ("Photosynthesis comprises light-dependent reactions in thylakoid membranes, generating ATP and NADPH "
          "that the Calvin-Benson cycle subsequently utilizes for ribulose-bisphosphate carboxylation.")
SHORT = "Gravity pulls things together."
LONG = ("Gravity is the attraction between masses. Isaac Newton described it as a force proportional to both "
        "masses and inversely proportional to the squared distance; Einstein later explained it as the curvature "
        "of spacetime, which also predicts gravitational waves, black holes and the bending of starlight.")
FRIENDLY = "Hey friend! Great question, haha :) Volcanoes are basically mountains that burp hot lava. Awesome!"
RUDE = "Obviously a volcano is a mountain with lava. Figure it out yourself, whatever. Don't bother asking again."


# --------------------------------------------------------------------------------------------
# Parsing and templates


@pytest.mark.parametrize(("text", "verdict"), [
    ("Output (a)", "A"), ("Output (b)", "B"), ("TIE", "tie"), ("output(b)", "B"), ("**Output (A)**", "A"),
    ("Output (a)\nBecause it is shorter than Output (b).", "A"), ("tie.", "tie"),
    ("Both outputs have merits.", "invalid"), ("Output (a) or Output (b)", "invalid"), ("", "invalid"),
    ("Output and more", "invalid"),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_every_catalog_preference_has_both_templates_and_placeholders():
    templates = TemplateSet()
    for pref in list(PREFS) + [CUSTOM]:
        for use in ("annotate", "evaluate"):
            text = templates.text(pref, use)
            for placeholder in ("{instruction}", "{output_a}", "{output_b}", "{criterion}"):
                assert placeholder in text, (pref.id, use, placeholder)
            assert ("TIE" in text) == (use == "evaluate")
    assert (shipped_templates_dir() / "P2A_annotate.txt").is_file()


def test_render_is_one_pass_and_recipe_templates_override(tmp_path):
    text = render_template("{instruction}|{output_a}|{output_b}", "say {output_b}", "x {criterion}", "y", "c")
    assert text == "say {output_b}|x {criterion}|y"
    (tmp_path / "P2A_evaluate.txt").write_text("MINE {criterion} {output_a} {output_b} {instruction}")
    templates = TemplateSet(tmp_path)
    assert templates.text(PREFS.get("P2A"), "evaluate").startswith("MINE")
    assert not templates.text(PREFS.get("P2A"), "annotate").startswith("MINE")  # falls back to the shipped one


# --------------------------------------------------------------------------------------------
# Rubric


@pytest.mark.parametrize(("pref", "winner", "loser"), [
    ("P1A", SIMPLE, EXPERT), ("P1B", EXPERT, SIMPLE), ("P2A", SHORT, LONG), ("P2B", LONG, SHORT),
    ("P3A", FRIENDLY, RUDE), ("P3B", RUDE, FRIENDLY),
])
def test_rubric_verdicts_per_preference(pref, winner, loser):
    judge = judge_for("rubric")
    out = judge.judge_many([JudgeRequest("Explain.", winner, loser, PREFS.get(pref)),
                            JudgeRequest("Explain.", loser, winner, PREFS.get(pref)),
                            JudgeRequest("Explain.", winner, winner, PREFS.get(pref))])
    assert [j.verdict for j in out] == ["A", "B", "tie"]
    assert measure(pref, winner) > measure(pref, loser)
    assert json.loads(out[0].raw)["a"] == pytest.approx(measure(pref, winner), abs=1e-3)


def test_rubric_tie_margin_and_aliases():
    assert compare(-20.0, -21.0, 0.05) == "tie"  # 1/21 < 5%
    assert compare(-20.0, -21.0, 0.0) == "A"
    assert compare(0.01, 0.02, 0.05) == "tie"  # near zero the floor of 1 keeps it absolute
    assert measure("concise", SHORT) == measure("P2A", SHORT) == -4.0
    assert measure("P2A", "") == 0.0 and measure("P1A", "") == 0.0


def test_rubric_refuses_custom_preferences_pointing_to_an_llm_judge():
    with pytest.raises(InputError, match="no rubric measure.*--judge openai"):
        measure(CUSTOM, "Arr matey")
    with pytest.raises(InputError, match="LLM judge"):
        judge_for("rubric", prefs=[CUSTOM]).check([CUSTOM])


def test_unknown_backend_suggests():
    with pytest.raises(InputError, match="did you mean 'openai'"):
        judge_for("opnai")
    assert set(JUDGES.names()) == {"rubric", "openai", "hf", "coin"}


# --------------------------------------------------------------------------------------------
# Cache


def test_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = JudgeCache(path)
    cache.put("k1", {"verdict": "A", "raw": "Output (a)"})
    cache.close()
    with open(path, "a") as handle:
        handle.write('{"key": "k2", "verdict": "B", "ra')  # killed mid-write
    cache = JudgeCache(path)
    assert cache.get("k1")["verdict"] == "A" and cache.get("k2") is None
    cache.put("k3", {"verdict": "tie"})
    cache.close()
    assert set(JudgeCache(path)._records) == {"k1", "k3"}


# --------------------------------------------------------------------------------------------
# OpenAI backend against the local fake server


def openai_recipe(server: FakeOpenAIServer, **fields) -> Recipe:
    sets = {"base_url": server.base_url, "api_key_env": "RLPHF_TEST_JUDGE_KEY", **fields}
    return recipe_with(*(f"judge.openai.{key}={value}" for key, value in sets.items()))


def fast_judge(recipe, cache_path):
    judge = judge_for("openai", recipe, cache_path=cache_path)
    judge.backoff_base = 0.02  # keep the test quick; Retry-After still decides where the server asks
    return judge


def requests_for(n: int, pref: str = "P2A", use: str = "evaluate") -> list[JudgeRequest]:
    return [JudgeRequest(f"[q{i}] Explain item {i}.", f"short answer {i}", f"a much longer answer number {i} here",
                         PREFS.get(pref), use=use) for i in range(n)]


def assert_no_key_in(*folders: Path) -> None:
    for folder in folders:
        for file in Path(folder).rglob("*"):
            if file.is_file():
                assert KEY not in file.read_text(errors="ignore"), file


def test_openai_faults_end_labelled_or_invalid_and_rerun_is_free(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    faults = {"[q0]": [("429", 0.2)], "[q1]": ["500", "500"], "[q2]": [("slow", 1.5)], "[q3]": ["garbage"],
              "[q4]": ["garbage"] * 3, "[q5]": ["drop"], "[q6]": ["502", ("429", 0)]}
    with FakeOpenAIServer(faults=faults) as server:
        recipe = openai_recipe(server, timeout=0.5, parse_retries=2, concurrency=4)
        judge = fast_judge(recipe, tmp_path / "cache.jsonl")
        seen = []
        out = judge.judge_many(requests_for(10), progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (10, 10)
        verdicts = [j.verdict for j in out]
        assert verdicts[4] == "invalid" and len(out[4].answers) == 3  # asked again twice, then invalid
        assert all(v == "A" for i, v in enumerate(verdicts) if i != 4)  # faults retried to a real answer
        assert all(j.error is None for j in out)
        stats = judge.stats
        assert stats.requests == server.requests == 10 + 1 + 2 + 1 + 1 + 2 + 1 + 2
        assert stats.retries == 7 and stats.reasks == 3 and stats.invalid == 1
        assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
        assert {entry["authorization"] for entry in server.log} == {f"Bearer {KEY}"}

        server.reset_counts()
        again = fast_judge(recipe, tmp_path / "cache.jsonl")
        rerun = again.judge_many(requests_for(10))
        assert server.requests == 0 and again.stats.cached == 10
        assert [j.verdict for j in rerun] == verdicts
    assert_no_key_in(tmp_path)


def test_openai_retry_after_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    with FakeOpenAIServer(faults={"[q0]": [("429", 1)]}) as server:
        judge = fast_judge(openai_recipe(server), None)
        judge.judge_many(requests_for(1))
        first, second = (entry["time"] for entry in server.log)
        assert second - first >= 0.95


def test_openai_exhausted_retries_are_failures_not_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    with FakeOpenAIServer(faults={"[q1]": ["503"] * 3, "[q2]": ["400"]}) as server:
        recipe = openai_recipe(server, max_retries=2)
        judge = fast_judge(recipe, tmp_path / "cache.jsonl")
        out = judge.judge_many(requests_for(3))
        assert out[0].verdict == "A"
        assert out[1].verdict == "invalid" and "HTTP 503 (3 attempts)" in out[1].error
        assert out[2].verdict == "invalid" and "HTTP 400" in out[2].error  # not worth a retry
        assert judge.stats.failed == 2 and server.requests == 1 + 3 + 1
        server.reset_counts()
        again = fast_judge(recipe, tmp_path / "cache.jsonl")
        assert [j.verdict for j in again.judge_many(requests_for(3))] == ["A", "A", "A"]
        assert server.requests == 2  # failures were not cached: only they are asked again


def test_openai_bad_key_stops_with_one_clear_error(monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    with FakeOpenAIServer(faults={"[q": ["401"] * 50}) as server:
        judge = fast_judge(openai_recipe(server), None)
        with pytest.raises(InputError, match=r"HTTP 401.*RLPHF_TEST_JUDGE_KEY") as info:
            judge.judge_many(requests_for(5))
        assert KEY not in str(info.value)


def test_openai_needs_a_key_for_the_public_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputError, match=r"\$OPENAI_API_KEY"):
        judge_for("openai")


def test_openai_runs_requests_concurrently(monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    with FakeOpenAIServer(latency=0.3) as server:
        judge = fast_judge(openai_recipe(server, concurrency=8), None)
        start = time.perf_counter()
        judge.judge_many(requests_for(8))
        assert time.perf_counter() - start < 2.0  # one at a time would take 2.4 s


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_judges import fast_judge, requests_for
from helpers import recipe_with
recipe = recipe_with("judge.openai.base_url={base_url}", "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY",
                     "judge.openai.concurrency=2")
fast_judge(recipe, {cache!r}).judge_many(requests_for(40))
"""


def test_sigkill_loses_only_requests_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAIServer(latency=0.1) as server:
        script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), base_url=server.base_url, cache=str(cache))
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
        deadline = time.time() + 60
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 6):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        answered = server.answered
        records = JudgeCache(cache)._records.values()
        answers, kept = sum("answer" in r for r in records), sum("verdict" in r for r in records)
        assert kept >= 2 and answers >= kept and answered - answers <= 2  # lost: the 2 requests in flight
        server.reset_counts()
        judge = fast_judge(openai_recipe(server), cache)
        out = judge.judge_many(requests_for(40))
        assert all(j.verdict == "A" for j in out)
        assert server.requests == 40 - answers and judge.stats.cached == kept  # no answer asked for twice


# --------------------------------------------------------------------------------------------
# Cost: a spending limit, batched prompts, the Batch API


def priced(server: FakeOpenAIServer, **fields) -> Recipe:
    """An openai judge at the fake server, at 10 USD per million input tokens and 30 per million output."""
    return openai_recipe(server, **{"price.input": 10, "price.output": 30, "poll_interval": 0.01, **fields})


def mixed_requests(n: int) -> list[JudgeRequest]:
    """Pairs whose shorter output is shown first, second, or ties, for two preferences and both uses."""
    out = []
    for i in range(n):
        short, long_ = f"short answer {i}", f"a much longer answer number {i} here"
        a, b = [(short, long_), (long_, short), (short, f"equal answer {i}")][i % 3]
        out.append(JudgeRequest(f"[q{i}] Explain item {i}.", a, b, PREFS.get("P2A" if i % 2 else "P3A"),
                                use="evaluate" if i % 4 < 2 else "annotate"))
    return out


@pytest.mark.parametrize(("text", "count", "expected"), [
    ("1. Output (a)\n2. Output (b)\n3. TIE", 3, {1: "A", 2: "B", 3: "tie"}),
    ("**1.** Output (b)\nPair 2: output(a)\n7. Output (a)", 2, {1: "B", 2: "A"}),  # 7 is no pair of 2
    ("1. Output (a)\n1. Output (b)\n2) It depends", 2, {1: "invalid", 2: "invalid"}),
    ("Output (a)", 2, {}),
])
def test_numbered_verdicts_of_a_batched_answer(text, count, expected):
    from rlphf_cli.judges.openai_judge import parse_numbered

    assert {n: v for n, (v, _) in parse_numbered(text, count).items()} == expected


def test_batched_prompts_give_each_pair_its_own_verdict_for_fewer_tokens(tmp_path, monkeypatch):
    """Five pairs a request (the paper's annotator): the same verdicts as one pair a request, fewer
    input tokens per pair; a pair left out of the answer is asked again alone; the cache is per pair."""
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    requests = mixed_requests(12)
    with FakeOpenAIServer(garble="[q3]") as server:
        single = fast_judge(openai_recipe(server), tmp_path / "one.jsonl")
        verdicts = [j.verdict for j in single.judge_many(requests)]
        assert server.requests == 12
        server.reset_counts()
        batched = fast_judge(openai_recipe(server, batch_size=5), tmp_path / "five.jsonl")
        out = batched.judge_many(requests)
        assert [j.verdict for j in out] == verdicts and set(verdicts) == {"A", "B", "tie"}
        # Per (preference, use): 3 + 3 + 3 + 3 pairs -> one request each, and [q3] again alone.
        assert server.requests == 4 + 1 == batched.stats.requests
        assert sum(j.prompt_tokens for j in out) < 0.75 * single.stats.prompt_tokens
        server.reset_counts()
        again = fast_judge(openai_recipe(server, batch_size=5), tmp_path / "five.jsonl")
        assert [j.verdict for j in again.judge_many(requests)] == verdicts and server.requests == 0
        assert sum(j.prompt_tokens for j in again.judge_many(requests)) == sum(j.prompt_tokens for j in out)


def test_a_spending_limit_stops_before_it_is_passed_and_the_rerun_goes_on(tmp_path, monkeypatch):
    from rlphf_cli.errors import SpendingLimitReached

    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    requests, cache = requests_for(10), tmp_path / "cache.jsonl"
    with FakeOpenAIServer() as server:
        plan = fast_judge(priced(server), cache).plan(requests)
        assert (plan.judgments, plan.cached, plan.requests) == (10, 0, 10) and plan.usd > 0
        judge = fast_judge(priced(server, concurrency=1), cache)
        judge.budget.limit = limit = round(4 * plan.usd / 10, 6)  # a request's highest cost, 4 times
        with pytest.raises(SpendingLimitReached, match=r"spent of the \$[0-9.]+ allowed.*verdicts not asked.*Run the "
                           r"same command again") as caught:
            judge.judge_many(requests)
        assert "\n" not in str(caught.value)
        paid = server.requests
        assert 4 <= paid < 10 and judge.budget.spent <= limit and judge.spend.requests == paid
        assert judge.spend.usd == pytest.approx((10 * judge.spend.prompt_tokens + 30 * judge.spend.completion_tokens) / 1e6)
        left = fast_judge(priced(server), cache).plan(requests)
        assert (left.cached, left.requests) == (paid, 10 - paid) and left.rate_measured and left.output_measured
        server.reset_counts()
        rest = fast_judge(priced(server), cache)
        assert all(j.verdict == "A" for j in rest.judge_many(requests))
        assert server.requests == 10 - paid  # nothing asked twice


def test_batch_api_answers_through_the_cache_and_the_chat_endpoint_takes_what_it_could_not(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    requests = requests_for(6)
    with FakeOpenAIServer(faults={"[q1]": ["garbage"], "[q2]": ["500"]}, batch_polls=2) as server:
        judge = fast_judge(priced(server, mode="batch"), tmp_path / "cache.jsonl")
        out = judge.judge_many(requests)
        assert all(j.verdict == "A" for j in out)
        assert (server.uploads, server.batches_created, server.batch_lines) == (1, 1, 6)
        assert server.requests == 2  # [q1]'s unreadable answer asked again, [q2]'s failed line asked anew
        assert judge.spend.requests == 5 + 2 and judge.spend.usd > 0
        assert all(j.prompt_tokens > 0 for j in out)  # each verdict carries what its answers cost


BATCH_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_judges import fast_judge, requests_for
from helpers import recipe_with
recipe = recipe_with("judge.openai.base_url={base_url}", "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY",
                     "judge.openai.mode=batch", "judge.openai.poll_interval=0.05")
fast_judge(recipe, {cache!r}).judge_many(requests_for(6))
"""


def test_a_run_killed_while_its_batch_is_pending_picks_it_up_instead_of_paying_twice(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    cache, hold = tmp_path / "cache.jsonl", threading.Event()
    with FakeOpenAIServer(hold=hold) as server:
        script = BATCH_KILL_SCRIPT.format(tests=str(Path(__file__).parent), base_url=server.base_url, cache=str(cache))
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
        deadline = time.time() + 60
        while time.time() < deadline and not (cache.exists() and "batch_id" in cache.read_text()):
            time.sleep(0.05)
        time.sleep(0.2)  # polling
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert server.batches_created == 1 and server.batch_lines == 0
        hold.set()  # the provider finishes the batch while nobody waits for it
        server.reset_counts()
        judge = fast_judge(openai_recipe(server, mode="batch", poll_interval=0.05), cache)
        assert all(j.verdict == "A" for j in judge.judge_many(requests_for(6)))
        assert (server.uploads, server.batches_created, server.requests) == (0, 0, 0)
        assert server.batch_lines == 6  # the first batch's lines, run once


# --------------------------------------------------------------------------------------------
# HF backend


def test_hf_judge_on_tiny_random_model(tiny_random_model, tmp_path):
    recipe = recipe_with(f"judge.hf.model={tiny_random_model}", "judge.hf.batch_size=4")
    requests = requests_for(3, use="evaluate") + requests_for(3, pref="P3A", use="annotate")
    judge = judge_for("hf", recipe, cache_path=tmp_path / "cache.jsonl")
    out = judge.judge_many(requests)
    assert all(j.verdict in ("A", "B", "tie") for j in out)
    assert all(j.verdict != "tie" for j in out[3:])  # two-way: no TIE option
    assert all(0.3 < j.confidence <= 1.0 for j in out)
    assert set(json.loads(out[0].raw)["logprobs"]) == {"Output (a)", "Output (b)", "TIE"}
    # Deterministic (no sampling), and a cached rerun never loads the model.
    again = judge_for("hf", recipe, cache_path=tmp_path / "cache.jsonl")
    assert [j.verdict for j in again.judge_many(requests)] == [j.verdict for j in out]
    assert again._model is None and again.stats.cached == 6


def test_hf_judge_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        judge_for("hf", recipe_with(f"judge.hf.model={tmp_path / 'nope'}"))


# --------------------------------------------------------------------------------------------
# Win rates


def test_win_rate_ties_count_half_and_bootstrap_interval():
    assert win_rate(3, 2, 5) == pytest.approx(0.4)
    assert win_rate(0, 0, 0) is None
    outcomes = [(str(i), o) for i, o in enumerate(["win"] * 30 + ["tie"] * 10 + ["loss"] * 10 + ["invalid"] * 3)]
    summary = summarize(outcomes, samples=500, seed=1)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["invalid"], summary["n"]) == (30, 10, 10, 3, 50)
    assert summary["win_rate"] == 0.7
    assert summary["ci_low"] < 0.7 < summary["ci_high"] and summary["ci_high"] - summary["ci_low"] < 0.35
    assert summarize(outcomes, samples=500, seed=1) == summary  # seeded
    assert bootstrap_ci([[1.0]] * 5, samples=100) == (1.0, 1.0)
    assert bootstrap_ci([], samples=100) == (None, None)


def test_judge_intervals_resample_prompts_with_all_their_combinations():
    """One prompt judged in 8 combinations is one draw from the prompt distribution, not 8: the
    interval is the cluster bootstrap over prompts, wider than treating (prompt, combination) as
    independent when a prompt's outcomes agree across combinations."""
    from rlphf_cli.evaluation.judging import _summary

    rng = __import__("random").Random(0)
    per_prompt = {f"q{i}": rng.choice(["win", "win", "loss", "tie"]) for i in range(40)}
    items = [{"id": q, "combo": f"c{c}", "outcome": o, "agree": True, "failed": False}
             for q, o in per_prompt.items() for c in range(8)]
    summary = _summary(items, 1000, 0)
    by_prompt = summarize([(i["id"], i["outcome"]) for i in items], 1000, 0)
    by_cell = summarize([(f"{i['id']}/{i['combo']}", i["outcome"]) for i in items], 1000, 0)
    assert (summary["ci_low"], summary["ci_high"]) == (by_prompt["ci_low"], by_prompt["ci_high"])
    assert summary["ci_high"] - summary["ci_low"] > 2 * (by_cell["ci_high"] - by_cell["ci_low"])


def _recipe_with_templates(folder: Path | None = None) -> Recipe:
    sets = ["judge.backend=coin"] + ([f"judge.templates={folder}"] if folder else [])
    return load_recipe(None, sets)


def test_coin_judge_renders_the_templates_and_decides_by_a_seeded_hash(tmp_path):
    pirate = Preference(**PIRATE)
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "P9X_annotate.txt").write_text(PIRATE_TEMPLATE)
    judge = judge_for("coin", _recipe_with_templates(folder), [pirate])
    judge.check([pirate])
    requests = [JudgeRequest(f"Tell me about {w}.", f"{w} is a word", f"arr, {w}", pirate, use="annotate")
                for w in "rain sun bread stars music maps tides snow bees roots".split()]
    verdicts = [j.verdict for j in judge.judge_many(requests)]
    assert set(verdicts) == {"A", "B"}  # annotation is two-way
    assert verdicts == [j.verdict for j in judge_for("coin", _recipe_with_templates(folder), [pirate]).judge_many(requests)]
    other_seed = load_recipe(None, ["judge.backend=coin", f"judge.templates={folder}", "judge.coin.seed=1"])
    assert verdicts != [j.verdict for j in judge_for("coin", other_seed, [pirate]).judge_many(requests)]
    # The verdicts follow the rendered prompt: another template text, other verdicts.
    (folder / "P9X_annotate.txt").write_text(PIRATE_TEMPLATE.replace("captain", "cook"))
    assert verdicts != [j.verdict for j in judge_for("coin", _recipe_with_templates(folder), [pirate]).judge_many(requests)]
    evaluated = judge_for("coin", _recipe_with_templates()).judge_many(
        [JudgeRequest(r.instruction, r.a, r.b, PreferenceSet.catalog().get("P2A")) for r in requests])
    assert {j.verdict for j in evaluated} <= {"A", "B", "tie"} and len({j.verdict for j in evaluated}) > 1
    assert "coin" in JUDGES and judge.describe()["backend"] == "coin"


@pytest.mark.parametrize(("text", "message"), [
    ("{instruction} {output_a} {outptu_b}", "unknown placeholder {outptu_b} (did you mean 'output_b'?)"),
    ("{instruction} {output_a} and nothing else", "has no {output_b}"),
])
def test_a_broken_template_is_refused_naming_the_file(tmp_path, text, message):
    (tmp_path / "P9X_evaluate.txt").write_text(text)
    with pytest.raises(InputError, match="P9X_evaluate.txt: ") as caught:  # refused when the judge is set up
        judge_for("coin", _recipe_with_templates(tmp_path), [Preference(**PIRATE)])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_two_orders_of_a_pair_are_never_in_one_batched_request(monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    with FakeOpenAIServer() as server:
        judge = fast_judge(openai_recipe(server, batch_size=5), None)
        requests = [r for req in requests_for(3) for r in (req, JudgeRequest(req.instruction, req.b, req.a, req.pref))]
        chunks = judge.chunks(list(enumerate(requests)))
        assert [[n for n, _ in chunk] for chunk in chunks] == [[0, 2, 4], [1, 3, 5]]
        assert [j.verdict for j in judge.judge_many(requests)] == ["A", "B"] * 3 and server.requests == 2
