"""`rlphf judge` (rlphf_cli.evaluation.judging): matching records, criteria, both orders, folders and
lists of files, the default output, and the error cases, on small hand-made generations."""

from __future__ import annotations

import json

import pytest
from fake_openai_server import FakeOpenAIServer
from helpers import make_generations, one_error_line, write_jsonl
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.evaluation.judging import judge_files
from rlphf_cli.jobs import judge_job
from rlphf_cli.recipe import Recipe, load_recipe

runner = CliRunner()
KEY = "sk-test-JUDGE-KEY-MUST-NOT-LEAK-987654321"


def test_judge_cli_rubric_end_to_end(tmp_path):
    a = make_generations(tmp_path / "a.jsonl", "soup", style=0)  # short, simple, a bit cheerful
    b = make_generations(tmp_path / "b.jsonl", "base", style=1)  # long, technical, neutral
    out = tmp_path / "judgments" / "a_vs_b.json"
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "P2A" in result.output
    data = json.loads(out.read_text())
    assert data["system_a"] == "soup" and data["system_b"] == "base" and data["pairs"] == 8
    assert data["judgments"] == 24 and data["both_orders"] is True
    pc = data["per_criterion"]
    assert pc["P1A"]["win_rate"] == 1.0 and pc["P2A"]["win_rate"] == 1.0
    assert pc["P1B"]["win_rate"] == 0.0 and pc["P2B"]["win_rate"] == 0.0
    assert pc["P2A"]["agreement"] == 1.0 and pc["P2A"]["wins"] == 4
    assert set(data["per_combo"]) == {"P1A+P2A+P3A", "P1B+P2B+P3B"}
    assert data["per_combo"]["P1A+P2A+P3A"]["per_criterion"]["P2A"]["win_rate"] == 1.0
    overall = data["overall"]
    assert overall["wins"] + overall["ties"] + overall["losses"] == 24
    assert overall["ci_low"] <= overall["win_rate"] <= overall["ci_high"]
    md = out.with_suffix(".md").read_text()
    assert "| overall |" in md and "| combo P1A+P2A+P3A |" in md and "95% CI" in md
    assert not (tmp_path / "judgments" / "judge_cache.jsonl").exists()  # the rubric needs no cache


def test_judge_criteria_all_and_single_order(tmp_path):
    a = make_generations(tmp_path / "a.jsonl", "soup", style=0, combos=("P2A",))
    b = make_generations(tmp_path / "b.jsonl", "base", style=1, combos=("P2A",))
    result = judge_files(judge_job(Recipe(), a, b, criteria_="all", out=tmp_path / "all.json"))
    assert list(result["per_criterion"]) == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    assert result["judgments"] == 24
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--criteria", "concise,P3A",
                                 "--single-order", "--out", str(tmp_path / "one.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "one.json").read_text())
    assert list(data["per_criterion"]) == ["P2A", "P3A"] and data["both_orders"] is False
    assert data["overall"]["agreement"] is None


def test_judge_folders_per_side_and_default_output(tmp_path):
    run = tmp_path / "run"
    for combo in ("P1A+P2A", "P1B+P2B"):
        make_generations(run / "generations" / "psoups" / f"{combo}.jsonl", "soup:x", 0, combos=(combo,))
        make_generations(run / "generations" / "base" / f"{combo}.jsonl", "base", 1, combos=(combo,))
    result = runner.invoke(app, ["judge", "--run-dir", str(run), "--a", str(run / "generations" / "psoups"),
                                 "--b", str(run / "generations" / "base")])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "judgments" / "psoups_vs_base.json").read_text())
    assert data["pairs"] == 8 and set(data["per_combo"]) == {"P1A+P2A", "P1B+P2B"}
    # A file is named by the system its records carry (as the report names it).
    result = runner.invoke(app, ["judge", "--run-dir", str(run), "--a", str(run / "generations" / "psoups" / "P1A+P2A.jsonl"),
                                 "--b", str(run / "generations" / "base" / "P1A+P2A.jsonl")])
    assert result.exit_code == 0, result.output
    assert (run / "judgments" / "soup-x_vs_base.json").is_file()
    (run / "generations" / "base" / "P1B+P2B.jsonl").rename(run / "generations" / "base" / "P1B.jsonl")
    result = runner.invoke(app, ["judge", "--a", str(run / "generations" / "psoups"),
                                 "--b", str(run / "generations" / "base"), "--out", str(tmp_path / "x.json")])
    one_error_line(result, "hold different files", "P1B+P2B.jsonl")


def test_two_comparisons_of_one_baseline_never_share_a_default_output(tmp_path):
    """A weighted soup and the P-Soups soup of one combination, each against the base model's plain
    answers: files of the same name, different systems, two judgments."""
    run = tmp_path / "run"
    plain = make_generations(run / "generations" / "base" / "plain.jsonl", "base", 1, combos=("P1A+P2A",))
    outs = []
    for folder, system in (("soup-P1A=0.7+P2A=0.3", "soup:P1A=0.7+P2A=0.3"), ("psoups", "psoups:P1A+P2A")):
        a = make_generations(run / "generations" / folder / "P1A+P2A.jsonl", system, 0, combos=("P1A+P2A",))
        result = runner.invoke(app, ["judge", "--run-dir", str(run), "--a", str(a), "--b", str(plain)])
        assert result.exit_code == 0, result.output
        outs.append(sorted(p.name for p in (run / "judgments").glob("*.json")))
    assert outs == [["soup-P1A=0.7+P2A=0.3_vs_base.json"],
                    ["psoups-P1A+P2A_vs_base.json", "soup-P1A=0.7+P2A=0.3_vs_base.json"]]


def test_judge_position_biased_judge_gives_ties_and_zero_agreement(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    a = make_generations(tmp_path / "a.jsonl", "soup", style=0, combos=("P2A",))
    b = make_generations(tmp_path / "b.jsonl", "base", style=1, combos=("P2A",))
    with FakeOpenAIServer(answer=lambda messages: "Output (a)") as server:
        recipe = load_recipe(None, ["judge.backend=openai", f"judge.openai.base_url={server.base_url}",
                                    "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY"])
        result = judge_files(judge_job(recipe, a, b, out=tmp_path / "j" / "out.json"))
        assert server.requests == 8  # 4 pairs x 2 orders
    overall = result["overall"]
    assert (overall["wins"], overall["ties"], overall["losses"]) == (0, 4, 0)
    assert overall["agreement"] == 0.0 and overall["win_rate"] == 0.5
    assert (tmp_path / "j" / "judge_cache.jsonl").is_file()


@pytest.mark.parametrize(("b_records", "fragments"), [
    ([{"id": "e0", "instruction": "[e0] Explain item 0.", "preferences": ["P2A"], "combo": "P2A", "response": "x"},
      {"id": "zz", "instruction": "[e1] Explain item 1.", "preferences": ["P2A"], "combo": "P2A", "response": "y"}],
     ("do not match by (id, combination)", "only in A", "only in B")),
    ([{"id": "e0", "instruction": "[e0] Explain item 0.", "preferences": ["P2B"], "combo": "P2B", "response": "x"},
      {"id": "e1", "instruction": "[e1] Explain item 1.", "preferences": ["P2B"], "combo": "P2B", "response": "y"}],
     ("do not match", "combination 'P2A'")),
    ([{"id": "e0", "instruction": "Something else", "preferences": ["P2A"], "combo": "P2A", "response": "x"},
      {"id": "e1", "instruction": "[e1] Explain item 1.", "preferences": ["P2A"], "combo": "P2A", "response": "y"}],
     ("different instructions",)),
])
def test_judge_mismatched_files_are_one_line_errors(tmp_path, b_records, fragments):
    a = make_generations(tmp_path / "a.jsonl", "soup", 0, combos=("P2A",), n=2)
    b = write_jsonl(tmp_path / "b.jsonl", b_records)
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "o.json")])
    one_error_line(result, *fragments)
    assert not (tmp_path / "o.json").exists()


def test_judge_common_judges_the_shared_records(tmp_path):
    a = make_generations(tmp_path / "a.jsonl", "soup", 0, combos=("P2A",), n=4)
    b = make_generations(tmp_path / "b.jsonl", "base", 1, combos=("P2A",), n=2)
    refused = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "o.json")])
    one_error_line(refused, "2 (e.g. id 'e2', combination 'P2A') only in A", "--common")
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--common", "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    assert "left out 2 records only in A and 0 only in B" in result.output
    judged = json.loads((tmp_path / "o.json").read_text())
    assert judged["pairs"] == 2 and judged["left_out"] == {"only_a": 2, "only_b": 0}


def test_judge_plain_answers_match_every_combination(tmp_path):
    """The base model's answers without a preference prompt (generations/base/plain.jsonl) are
    judged against each combination of the other side, as the report does."""
    a = tmp_path / "psoups"
    for combo in ("P1A+P2A", "P1B+P2B"):
        make_generations(a / f"{combo}.jsonl", "psoups", 0, combos=(combo,), n=3)
    plain = make_generations(tmp_path / "base" / "plain.jsonl", "base", 1, combos=("",), n=3)
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(plain), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    judged = json.loads((tmp_path / "o.json").read_text())
    assert judged["pairs"] == 6 and set(judged["per_combo"]) == {"P1A+P2A", "P1B+P2B"}


def test_judge_other_errors(tmp_path):
    a = make_generations(tmp_path / "a.jsonl", "soup", 0, combos=("",), n=2)  # no preferences at all
    b = make_generations(tmp_path / "b.jsonl", "base", 1, combos=("",), n=2)
    out = str(tmp_path / "o.json")
    one_error_line(runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--out", out]),
                   "carry no preferences", "--criteria")
    one_error_line(runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--criteria", "concize", "--out", out]),
                   "unknown preference 'concize'")
    one_error_line(runner.invoke(app, ["judge", "--a", str(tmp_path / "nope.jsonl"), "--b", str(b), "--out", out]),
                   "generations not found")
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--criteria", "P2A", "--out", out])
    assert result.exit_code == 0, result.output


def test_judge_lists_of_files_and_baseline_relabelled_with_combo(tmp_path):
    # As the pipeline does: one file per combination on each side; the base records carry no
    # preferences, only the combination they were relabelled with.
    a_files, b_files = [], []
    for combo in ("P1A+P2A", "P1B+P2B"):
        a_files.append(make_generations(tmp_path / "psoups" / f"{combo}.jsonl", "psoups", 0, combos=(combo,)))
        base = [{**r, "preferences": [], "system": "base"}
                for r in map(json.loads, make_generations(tmp_path / "tmp.jsonl", "base", 1, combos=(combo,))
                             .read_text().splitlines())]
        b_files.append(write_jsonl(tmp_path / "base" / f"{combo}.jsonl", base))
    result = judge_files(judge_job(Recipe(), a_files, b_files, out=tmp_path / "judgments" / "psoups_vs_base.json"))
    assert result["system_a"] == "psoups" and result["system_b"] == "base"
    assert set(result["per_criterion"]) == {"P1A", "P2A", "P1B", "P2B"} and result["judgments"] == 16
    assert result["per_criterion"]["P2A"]["win_rate"] == 1.0


def test_judge_dry_run_and_spend_in_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    a = make_generations(tmp_path / "a.jsonl", "soup", style=0, combos=("P2A+P3A",))
    b = make_generations(tmp_path / "b.jsonl", "base", style=1, combos=("P2A+P3A",))
    out = tmp_path / "j" / "out.json"
    with FakeOpenAIServer() as server:
        args = ["judge", "--a", str(a), "--b", str(b), "--out", str(out), "--judge", "openai",
                "--set", f"judge.openai.base_url={server.base_url}", "--set", "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY",
                "--set", "judge.openai.batch_size=4", "--set", "judge.openai.price.input=10",
                "--set", "judge.openai.price.output=30"]
        dry = runner.invoke(app, [*args, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        # 4 records x 2 criteria x 2 orders = 16 verdicts, 4 pairs of one criterion a request
        assert "judge: 16 verdicts, 0 cached; 4 requests to send" in dry.output and not out.exists()
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert server.requests == 4 and "spent" in result.output
    data = json.loads(out.read_text())
    assert data["spend"]["requests"] == 4 and data["cost"]["usd"] == data["spend"]["usd"] > 0
