"""`rlphf annotate` (rlphf_cli.judges.annotate) on small hand-made rollouts: the rubric judge, the openai
judge against the local fake server, and the error cases."""

from __future__ import annotations

import json

import pytest
from fake_openai_server import FakeOpenAIServer
from helpers import make_rollouts, one_error_line
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.jobs import annotate_job
from rlphf_cli.judges.annotate import annotate_rollouts
from rlphf_cli.judges.rubric import words
from rlphf_cli.recipe import Recipe

runner = CliRunner()
KEY = "sk-test-ANNOTATE-KEY-MUST-NOT-LEAK-987654321"


runner = CliRunner()
KEY = "sk-test-ANNOTATE-KEY-MUST-NOT-LEAK-987654321"

def test_annotate_cli_rubric_end_to_end(tmp_path):
    rollouts = make_rollouts(tmp_path / "rollouts.jsonl")
    out = tmp_path / "ann"
    args = ["annotate", "--rollouts", str(rollouts), "--out", str(out), "--prefs", "all", "--judge", "rubric",
            "--pairs-per-prompt", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "P3B" in result.output and "ties dropped" in result.output
    for pref in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B"):
        rows = [json.loads(line) for line in (out / f"{pref}.jsonl").read_text().splitlines()]
        summary = json.loads((out / f"{pref}.summary.json").read_text())
        assert summary["pairs"] == 12 and summary["identical_samples"] == 1 and summary["prompts"] == 7
        assert summary["written"] == len(rows) == 12 - summary["ties_dropped"] - summary["invalid"]
        assert rows and set(rows[0]) == {"prompt", "chosen", "rejected", "id", "preference"}
        assert all(r["preference"] == pref and r["chosen"] != r["rejected"] for r in rows)
        assert not rows[0]["prompt"].endswith("student.")  # the plain instruction, no preference prompt
    concise = [json.loads(line) for line in (out / "P2A.jsonl").read_text().splitlines()]
    assert all(len(words(r["chosen"])) < len(words(r["rejected"])) for r in concise)
    first = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    assert runner.invoke(app, args).exit_code == 0
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == first  # seeded: same pairs, same order


def test_annotate_position_order_is_randomised_per_preference(tmp_path):
    rollouts = make_rollouts(tmp_path / "rollouts.jsonl", prompts=40, samples=2)
    summary = annotate_rollouts(annotate_job(Recipe(), rollouts=rollouts, prefs="P2A,friendly", out_dir=tmp_path / "ann"))
    for pref in ("P2A", "P3A"):
        assert 0.2 < summary["preferences"][pref]["first_shown_rate"] < 0.8


def test_annotate_defaults_to_the_run_dir_and_names_the_command_when_rollouts_are_missing(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["annotate", "--run-dir", str(run), "--no-deps"])
    one_error_line(result, f"1 input missing: rollouts ({run / 'rollouts.jsonl'})", "go on with:")
    assert not (run / "annotations").exists()
    make_rollouts(run / "rollouts.jsonl")
    result = runner.invoke(app, ["annotate", "--run-dir", str(run), "--prefs", "concise"])
    assert result.exit_code == 0, result.output
    assert (run / "annotations" / "P2A.jsonl").is_file() and not (run / "annotations" / "P1A.jsonl").exists()
    assert (run / "recipe.yaml").is_file()


@pytest.mark.parametrize(("records", "fragments"), [
    ('{"id": "p0", "instruction": "x", "responses": ["a"]}\n', ("one sample per prompt", "--num-samples 2")),
    ('{"id": "p0", "instruction": "x", "responses": ["a", "a"]}\n', ("no pair of distinct samples",)),
    ('{"id": "p0", "instruction": "x"}\n', ("'responses' list",)),
    ('{"id": "p0", "instruction": "x", "responses": ["a", "b"]}\n{broken\n', ("line 2: invalid JSON",)),
])
def test_annotate_bad_rollouts_are_one_line_errors(tmp_path, records, fragments):
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text(records)
    result = runner.invoke(app, ["annotate", "--rollouts", str(rollouts), "--out", str(tmp_path / "ann")])
    one_error_line(result, *fragments)
    assert not (tmp_path / "ann").exists() or not list((tmp_path / "ann").glob("*.jsonl"))


def test_annotate_custom_preference_needs_an_llm_judge(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preferences:\n  define:\n    - {id: P4A, alias: pirate, dimension: voice, "
                      "prompt: 'Talk like a pirate.', criterion: 'Which response sounds more like a pirate?'}\n")
    rollouts = make_rollouts(tmp_path / "rollouts.jsonl")
    result = runner.invoke(app, ["annotate", "--recipe", str(recipe), "--rollouts", str(rollouts),
                                 "--out", str(tmp_path / "ann"), "--prefs", "pirate"])
    one_error_line(result, "'P4A' has no rubric measure", "--judge openai")
    result = runner.invoke(app, ["annotate", "--rollouts", str(rollouts), "--out", str(tmp_path / "ann"),
                                 "--judge", "rubrik"])
    one_error_line(result, "unknown judge 'rubrik'", "did you mean 'rubric'")


def test_annotate_with_the_openai_judge_keeps_the_key_out_of_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    run = tmp_path / "run"
    make_rollouts(run / "rollouts.jsonl")
    with FakeOpenAIServer(faults={"[q1]": ["500"], "[q2]": ["garbage"]}) as server:
        args = ["annotate", "--run-dir", str(run), "--judge", "openai", "--prefs", "P2A,P3B",
                "--set", f"judge.openai.base_url={server.base_url}", "--set", "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads((run / "annotations" / "P2A.summary.json").read_text())
        assert summary["written"] == 6 and summary["requests"] >= 6 and summary["prompt_tokens"] > 0
        assert summary["judge"]["api_key_env"] == "RLPHF_TEST_JUDGE_KEY"
        rows = [json.loads(line) for line in (run / "annotations" / "P2A.jsonl").read_text().splitlines()]
        assert all(len(r["chosen"].split()) < len(r["rejected"].split()) for r in rows)  # the server's rule
        first_requests = server.requests
        assert first_requests == 12 + 2  # 6 pairs x 2 preferences, one 500 retried, one garbage re-asked
        server.reset_counts()
        again = runner.invoke(app, args)
        assert again.exit_code == 2 and "P2A.jsonl: exists" in again.output and "--force" in again.output
        assert runner.invoke(app, [*args, "--force"]).exit_code == 0
        assert server.requests == 0  # everything came from annotations/judge_cache.jsonl
    assert (run / "annotations" / "judge_cache.jsonl").is_file()
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert KEY not in file.read_text(errors="ignore"), file


# --------------------------------------------------------------------------------------------
# judge


def test_annotate_general_preference_for_the_rlhf_baseline(tmp_path):
    from rlphf_cli.judges import GENERAL_PREFERENCE

    rollouts = make_rollouts(tmp_path / "rollouts.jsonl")
    summary = annotate_rollouts(annotate_job(Recipe(), rollouts=rollouts, prefs=[GENERAL_PREFERENCE.id],
                                             out_dir=tmp_path / "ann"))
    rows = [json.loads(line) for line in (tmp_path / "ann" / "general.jsonl").read_text().splitlines()]
    assert summary["preferences"]["general"]["written"] == len(rows) > 0
    assert all(r["preference"] == "general" for r in rows)


def test_annotate_dry_run_counts_the_requests_and_max_cost_stops_then_the_rerun_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    run = tmp_path / "run"
    make_rollouts(run / "rollouts.jsonl")
    with FakeOpenAIServer() as server:
        args = ["annotate", "--run-dir", str(run), "--judge", "openai", "--prefs", "P2A,P3B",
                "--set", f"judge.openai.base_url={server.base_url}", "--set", "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY",
                "--set", "judge.openai.price.input=10", "--set", "judge.openai.price.output=30",
                "--set", "judge.openai.concurrency=1"]
        dry = runner.invoke(app, [*args, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert "annotate: 12 verdicts, 0 cached; 12 requests to send" in dry.output
        assert "at $10 / $30 per million tokens" in dry.output and server.requests == 0
        assert not (run / "annotations").exists()
        stopped = runner.invoke(app, [*args, "--max-cost", "0.005"])
        line = one_error_line(stopped, "spending limit: $0.00", "of the $0.005 allowed", "verdicts not asked",
                              "Run the same command again")
        assert "judge_cache.jsonl" in line and not (run / "annotations" / "P2A.jsonl").exists()
        paid = server.requests
        assert 0 < paid < 12
        dry = runner.invoke(app, [*args, "--dry-run"])
        assert f"{paid} cached; {12 - paid} requests to send" in dry.output
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
        assert server.requests == 12  # nothing paid twice
    summary = json.loads((run / "annotations" / "P2A.summary.json").read_text())
    cost = summary["cost"]
    assert cost["price"] == {"input": 10.0, "output": 30.0} and cost["prompt_tokens"] > 0
    assert cost["usd"] == pytest.approx((10 * cost["prompt_tokens"] + 30 * cost["completion_tokens"]) / 1e6, abs=1e-6)


def test_a_spending_limit_needs_a_price(tmp_path):
    rollouts = make_rollouts(tmp_path / "rollouts.jsonl")
    result = runner.invoke(app, ["annotate", "--rollouts", str(rollouts), "--out", str(tmp_path / "ann"),
                                 "--judge", "openai", "--max-cost", "1"])
    one_error_line(result, "judge.max_cost: the openai judge (annotate.judge) has no price",
                   "judge.openai.price")
    assert not (tmp_path / "ann").exists()
