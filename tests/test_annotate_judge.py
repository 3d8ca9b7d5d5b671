"""`rlphf annotate` and `rlphf judge` end to end on small hand-made files (rubric judge, and the
openai judge against the local fake server), plus their error cases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.evaluation.judging import judge_files
from rlphf_cli.jobs import annotate_job, judge_job
from rlphf_cli.judges.annotate import annotate_rollouts
from rlphf_cli.judges.rubric import words
from rlphf_cli.recipe import Recipe, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

runner = CliRunner()
KEY = "sk-test-ANNOTATE-KEY-MUST-NOT-LEAK-987654321"

SAMPLES = [
    "Plants use sunlight to make food. It is fun!",
    "Photosynthesis converts photons into chemical energy through chlorophyll-mediated electron transport chains.",
    "Hey friend! Plants basically cook with sunshine, haha :) Awesome, right? Yay!",
    "Obviously plants make food from light. Figure it out yourself.",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_rollouts(path: Path, prompts: int = 6, samples: int = 3) -> Path:
    records = [{"id": f"p{i}", "instruction": f"[q{i}] Explain photosynthesis, part {i}.", "preferences": [],
                "combo": "", "system": "base", "response": SAMPLES[i % 4],
                "responses": [SAMPLES[(i + k) % 4] for k in range(samples)]} for i in range(prompts)]
    records.append({"id": "dup", "instruction": "Say hi.", "preferences": [], "combo": "", "system": "base",
                    "response": "hi", "responses": ["hi", "hi"]})
    return write_jsonl(path, records)


def make_generations(path: Path, system: str, style: int, combos=("P1A+P2A+P3A", "P1B+P2B+P3B"), n: int = 4) -> Path:
    records = []
    for combo in combos:
        for i in range(n):
            text = SAMPLES[style] if style >= 0 else SAMPLES[i % 4]
            records.append({"id": f"e{i}", "instruction": f"[e{i}] Explain item {i}.", "preferences": [p for p in combo.split("+") if p],
                            "combo": combo, "system": system, "response": text, "responses": [text]})
    return write_jsonl(path, records)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# annotate


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
    result = runner.invoke(app, ["annotate", "--run-dir", str(run)])
    one_line_error(result, "rollouts not found", f"rlphf generate --num-samples 2 --out {run / 'rollouts.jsonl'}")
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
    one_line_error(result, *fragments)
    assert not (tmp_path / "ann").exists() or not list((tmp_path / "ann").glob("*.jsonl"))


def test_annotate_custom_preference_needs_an_llm_judge(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preferences:\n  define:\n    - {id: P4A, alias: pirate, dimension: voice, "
                      "prompt: 'Talk like a pirate.', criterion: 'Which response sounds more like a pirate?'}\n")
    rollouts = make_rollouts(tmp_path / "rollouts.jsonl")
    result = runner.invoke(app, ["annotate", "--recipe", str(recipe), "--rollouts", str(rollouts),
                                 "--out", str(tmp_path / "ann"), "--prefs", "pirate"])
    one_line_error(result, "'P4A' has no rubric measure", "--judge openai")
    result = runner.invoke(app, ["annotate", "--rollouts", str(rollouts), "--out", str(tmp_path / "ann"),
                                 "--judge", "rubrik"])
    one_line_error(result, "unknown judge 'rubrik'", "did you mean 'rubric'")


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
    # One file per side with the same name: judgments/<A>_vs_<B>/<combo>.json
    result = runner.invoke(app, ["judge", "--run-dir", str(run), "--a", str(run / "generations" / "psoups" / "P1A+P2A.jsonl"),
                                 "--b", str(run / "generations" / "base" / "P1A+P2A.jsonl")])
    assert result.exit_code == 0, result.output
    assert (run / "judgments" / "psoups_vs_base" / "P1A+P2A.json").is_file()
    (run / "generations" / "base" / "P1B+P2B.jsonl").rename(run / "generations" / "base" / "P1B.jsonl")
    result = runner.invoke(app, ["judge", "--a", str(run / "generations" / "psoups"),
                                 "--b", str(run / "generations" / "base"), "--out", str(tmp_path / "x.json")])
    one_line_error(result, "hold different files", "P1B+P2B.jsonl")


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
    one_line_error(result, *fragments)
    assert not (tmp_path / "o.json").exists()


def test_judge_common_judges_the_shared_records(tmp_path):
    a = make_generations(tmp_path / "a.jsonl", "soup", 0, combos=("P2A",), n=4)
    b = make_generations(tmp_path / "b.jsonl", "base", 1, combos=("P2A",), n=2)
    refused = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "o.json")])
    one_line_error(refused, "2 (e.g. id 'e2', combination 'P2A') only in A", "--common")
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
    one_line_error(runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--out", out]),
                   "carry no preferences", "--criteria")
    one_line_error(runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--criteria", "concize", "--out", out]),
                   "unknown preference 'concize'")
    one_line_error(runner.invoke(app, ["judge", "--a", str(tmp_path / "nope.jsonl"), "--b", str(b), "--out", out]),
                   "generations not found")
    result = runner.invoke(app, ["judge", "--a", str(a), "--b", str(b), "--criteria", "P2A", "--out", out])
    assert result.exit_code == 0, result.output


def test_annotate_general_preference_for_the_rlhf_baseline(tmp_path):
    from rlphf_cli.judges import GENERAL_PREFERENCE

    rollouts = make_rollouts(tmp_path / "rollouts.jsonl")
    summary = annotate_rollouts(annotate_job(Recipe(), rollouts=rollouts, prefs=[GENERAL_PREFERENCE.id],
                                             out_dir=tmp_path / "ann"))
    rows = [json.loads(line) for line in (tmp_path / "ann" / "general.jsonl").read_text().splitlines()]
    assert summary["preferences"]["general"]["written"] == len(rows) > 0
    assert all(r["preference"] == "general" for r in rows)


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
