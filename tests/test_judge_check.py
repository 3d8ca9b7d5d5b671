"""`rlphf judge-check` (rlphf_cli.judges.check): a judge against labelled pairs. The shipped set with the
rubric judge; agreement, flips and ties checked on judges whose answers are known (the local server
answering by position or always TIE); bad label files."""

from __future__ import annotations

import json

import pytest
from fake_openai_server import FakeOpenAIServer
from helpers import one_error_line, write_jsonl
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.judges.check import load_labels, shipped_labels
from rlphf_cli.preferences import CATALOG, PreferenceSet

runner = CliRunner()
KEY = "sk-test-JUDGE-CHECK-KEY-0000000000"


def test_the_shipped_set_has_twenty_reasoned_pairs_per_builtin_preference():
    rows = load_labels(shipped_labels(), PreferenceSet.catalog())
    assert {p.id: sum(r["preference"] == p.id for r in rows) for p in CATALOG} == {p.id: 20 for p in CATALOG}
    assert all(r["reason"] and r["chosen"] != r["rejected"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_rubric_judge_on_the_shipped_set(tmp_path):
    out = tmp_path / "check.json"
    result = runner.invoke(app, ["judge-check", "--judge", "rubric", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["per_preference"]) == [p.id for p in CATALOG] and data["overall"]["pairs"] == 120
    for s in data["per_preference"].values():
        assert s["pairs"] == 20 and s["invalid"] == 0 and s["ci_low"] <= s["agreement"] <= s["ci_high"]
        assert s["flip_rate"] == 0.0  # the rubric measures each text: the order cannot matter
    assert data["overall"]["agreement"] >= 0.9
    assert "P3B" in result.output and "agreement" in result.output


LABELS = [{"prompt": f"Question {i}?", "chosen": f"short {i}", "rejected": f"a much longer answer {i}",
           "preference": pref, "id": f"x{i}"} for i, pref in enumerate(["concise", "P2A", "P3A", "P3A"])]


@pytest.mark.parametrize(("answer", "agreement", "flips", "ties"), [
    ("Output (a)", 0.5, 1.0, 0.0),  # always the first shown: right in one order, wrong in the other
    ("TIE", 0.5, 0.0, 1.0),
    (None, 1.0, 0.0, 0.0),  # the server's rule (shorter wins) is the labels' rule
])
def test_agreement_flips_and_ties_of_known_judges(tmp_path, monkeypatch, answer, agreement, flips, ties):
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", KEY)
    monkeypatch.setenv("RLPHF_HOME", str(tmp_path / "home"))
    labels = write_jsonl(tmp_path / "labels.jsonl", LABELS)
    with FakeOpenAIServer(answer=(lambda messages: answer) if answer else None) as server:
        out = tmp_path / "check.json"
        result = runner.invoke(app, ["judge-check", "--labels", str(labels), "--judge", "openai", "--out", str(out),
                                     "--set", f"judge.openai.base_url={server.base_url}",
                                     "--set", "judge.openai.api_key_env=RLPHF_TEST_JUDGE_KEY",
                                     "--set", "judge.openai.price.input=10", "--set", "judge.openai.price.output=30"])
        assert result.exit_code == 0, result.output
        assert server.requests == 8
    data = json.loads(out.read_text())
    assert set(data["per_preference"]) == {"P2A", "P3A"}
    overall = data["overall"]
    assert (overall["agreement"], overall["flip_rate"], overall["tie_rate"]) == (agreement, flips, ties)
    cost = overall["cost"]
    assert cost["usd"] == pytest.approx((10 * cost["prompt_tokens"] + 30 * cost["completion_tokens"]) / 1e6, abs=1e-6)
    assert (tmp_path / "home" / "judge-check" / "judge_cache.jsonl").is_file()


@pytest.mark.parametrize(("row", "fragment"), [
    ({"prompt": "Q?", "chosen": "a", "preference": "P2A"}, "line 2: a labelled pair needs a non-empty 'rejected'"),
    ({"prompt": "Q?", "chosen": "a", "rejected": "b", "preference": "consise"},
     "line 2: unknown preference 'consise' (did you mean 'concise'?)"),
])
def test_a_bad_label_file_is_one_line_naming_the_line(tmp_path, row, fragment):
    labels = write_jsonl(tmp_path / "labels.jsonl", [LABELS[0], row])
    one_error_line(runner.invoke(app, ["judge-check", "--labels", str(labels)]), f"{labels}: {fragment}")
