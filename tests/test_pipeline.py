"""`rlphf run` (rlphf_cli.pipeline) end to end on the tiny random fixture: every artifact, a rerun that
recomputes nothing, a finished run rerun from its own recipe.yaml, a dimension added to a finished run."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import mtimes
from test_generation import write_prompts
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.runs import RunDir

runner = CliRunner()

WORDS = ["sun", "rain", "bread", "music", "stars", "rivers", "gravity", "volcanoes", "magnets", "bees",
         "clouds", "trains", "snow", "maps", "tides", "roots"]


@pytest.fixture
def pipeline_recipe(tmp_path, tiny_random_model):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Tell me about {w}."}) + "\n"
                             for i, w in enumerate(WORDS)))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"What are {w}?"}) + "\n"
                                  for i, w in enumerate(WORDS[:6])))
    recipe = {
        "name": "pipeline-test",
        "run_dir": str(tmp_path / "run"),
        "model": {"name": str(tiny_random_model)},
        "preferences": {"use": ["P1A", "P2A"]},  # rubric measures that separate random text
        "data": {"train_prompts": str(train), "eval_prompts": str(evaluation)},
        "generate": {"max_new_tokens": 12, "batch_size": 16},
        "annotate": {"num_samples": 2},
        "train_rm": {"trl": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64}},
        "train_policy": {"rloo": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                                  "max_completion_length": 8},
                         "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 160}},
        "judge": {"bootstrap_samples": 50},
        "evaluation": {"baselines": ["base", "prompted", "multitask", "psoups-decoding"],
                       "sweep": {"prefs": ["P1A", "P2A"], "weights": [0, 0.5, 1]},
                       "pareto": {"prefs": ["P1A", "P2A"], "weights": [0, 0.5, 1]}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "run"


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "events.jsonl" not in p.name
            and p.name not in ("recipe.yaml", "env.json")}


@pytest.mark.slow
def test_run_pipeline_end_to_end_then_resume(pipeline_recipe):
    recipe, run = pipeline_recipe
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    combo = "P1A+P2A"
    expected = [
        "recipe.yaml", "env.json", "events.jsonl", "rollouts.jsonl",
        "annotations/P1A.jsonl", "annotations/P2A.jsonl",
        "rm/P1A/metrics.json", "rm/P2A/adapter_model.safetensors",
        "policy/P1A/adapter_model.safetensors", "policy/P2A/metrics.jsonl", "policy/P2A/adapter_config.json",
        f"soups/{combo}/soup.json", f"soups/{combo}/adapter_model.safetensors",
        "generations/base/plain.jsonl", f"generations/psoups/{combo}.jsonl", f"generations/prompted/{combo}.jsonl",
        "generations/experts/P1A.jsonl", "generations/sweep/w0.5.jsonl",
        "judgments/psoups_vs_base.json", "judgments/psoups_vs_prompted.json", "judgments/prompted_vs_base.json",
        "policy/multitask/training.json", f"generations/multitask/{combo}.jsonl", "judgments/multitask_vs_base.json",
        "judgments/psoups_vs_multitask.json", "report/systems_vs_base.png",
        "judgments/experts_vs_base.json", "judgments/experts_vs_prompted.json", "generations/prompted/P1A.jsonl",
        "report/report.md", "report/summary.json", "report/training_curves.png", "report/sweep.png",
        f"generations/psoups-decoding/{combo}.jsonl", "judgments/psoups-decoding_vs_base.json",
        "judgments/psoups_vs_psoups-decoding.json", "report/pareto.png",
        *[f"generations/pareto-{m}/w{w}.jsonl" for m in ("params", "logits", "prompted") for w in ("0", "0.5", "1")],
    ]
    missing = [name for name in expected if not (run / name).exists()]
    assert not missing, missing
    report = (run / "report" / "report.md").read_text()
    for section in ("every system against the base model", "P-Soups head to head", "Per combination and criterion",
                    "Single-preference experts", "Reward models", "Policy training", "Weight sweep", "Cost"):
        assert section in report
    assert "the same preference prompt" in report and "clipped" in report
    # Answers side by side: the first held-out prompt's answers, as generated, one row per system.
    first = json.loads((run / "generations/base/plain.jsonl").read_text().splitlines()[0])
    table = report.split("## Answers side by side")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| system")]
    assert first["instruction"] in table and f"| {' '.join(first['response'].split())} |" in table
    assert [r.split(" | ")[0] for r in rows[:5]] == ["| base model (no preference prompt)", f"| prompting (PP) {combo}",
                                                     f"| P-Soups {combo}", "| expert P1A (elementary)",
                                                     "| expert P2A (concise)"]
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary["experts_vs_prompted"]) == {"P1A", "P2A"}
    # The seventh system: the same experts mixed at decoding time, two forwards per token, timed in this run.
    assert "P-Soups (decoding)" in report and "forwards per token" in report
    cost = summary["decoding_cost"]
    assert cost["psoups-decoding"]["forwards_per_token"] == 2 and cost["psoups"]["forwards_per_token"] == 1
    assert all(row["tokens"] > 0 and row["tokens_per_s"] > 0 for row in cost.values())
    mixed = [json.loads(line) for line in (run / f"generations/psoups-decoding/{combo}.jsonl").read_text().splitlines()]
    assert all(r["weights"]["compose"] == "logits" and r["preferences"] == ["P1A", "P2A"] for r in mixed)
    assert "psoups-decoding" in summary["psoups_head_to_head"]
    # The pareto stage: three fronts of three points, both measures with intervals, and the sentence.
    fronts = summary["pareto"]["fronts"]
    assert {m: [p["weight"] for p in f] for m, f in fronts.items()} == {
        m: [0, 0.5, 1] for m in ("pareto-params", "pareto-logits", "pareto-prompted")}
    assert all(p[q]["ci_low"] <= p[q]["mean"] <= p[q]["ci_high"] for f in fronts.values() for p in f for q in ("P1A", "P2A"))
    # All weight on one expert: the soup and the mix are that expert, the same answers.
    for w in ("0", "1"):
        soup, mix = ((run / f"generations/pareto-{m}/w{w}.jsonl").read_text().splitlines() for m in ("params", "logits"))
        assert [json.loads(x)["response"] for x in soup] == [json.loads(x)["response"] for x in mix]
    assert "## Pareto front" in report and "neither front dominates" in report
    assert [c["check"] for c in summary["checks"]][:2] == [
        "expert P1A beats the base model prompted with P1A, on P1A",
        "expert P2A beats the base model prompted with P2A, on P2A"]
    prompted_p1a = [json.loads(line) for line in (run / "generations/prompted/P1A.jsonl").read_text().splitlines()]
    assert all(r["preferences"] == ["P1A"] for r in prompted_p1a)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in events if e["event"] == "end"} >= {"rollouts", "train-rm", "merge", "report"}
    assert all(e.get("outcome") == "ok" for e in events if e["event"] == "end" and "outcome" in e)

    # `rlphf judge` redoes a comparison of the report from the generation files.
    redo = runner.invoke(app, ["judge", "--recipe", str(recipe), "--a", str(run / "generations" / "psoups"),
                               "--b", str(run / "generations" / "base" / "plain.jsonl"), "--out",
                               str(run.parent / "redo.json")])
    assert redo.exit_code == 0, redo.output
    redone, reported = (json.loads(p.read_text()) for p in (run.parent / "redo.json", run / "judgments/psoups_vs_base.json"))
    assert redone["overall"] == reported["overall"] and redone["per_combo"] == reported["per_combo"]

    before = _mtimes(run)
    again = runner.invoke(app, ["run", str(recipe)])
    assert again.exit_code == 0, again.output
    assert _mtimes(run) == before  # nothing recomputed, nothing rewritten

    # A changed recipe value recomputes what depends on it, and only that.
    changed = runner.invoke(app, ["run", str(recipe), "--set", "judge.bootstrap_samples=40"])
    assert changed.exit_code == 0, changed.output
    after = _mtimes(run)
    assert after[run / "policy" / "P1A" / "adapter_model.safetensors"] == before[
        run / "policy" / "P1A" / "adapter_model.safetensors"]
    assert after[run / "judgments" / "psoups_vs_base.json"] != before[run / "judgments" / "psoups_vs_base.json"]

    # Judged by an LLM judge (the coin), the Pareto front is each point's win rate against the base
    # model's answers on both criteria; the answers are reused, only the judging and report rerun.
    coin = runner.invoke(app, ["run", str(recipe), "--set", "judge.backend=coin"])
    assert coin.exit_code == 0, coin.output
    latest = _mtimes(run)
    assert all(latest[p] == after[p] for p in after if "generations" in p.parts)
    fronts = json.loads((run / "report" / "summary.json").read_text())["pareto"]["fronts"]
    for method, points in fronts.items():
        for point in points:
            judged = json.loads((run / f"judgments/{method}-w{point['weight']:g}_vs_base.json").read_text())
            assert judged["judge"]["backend"] == "coin" and set(judged["per_criterion"]) == {"P1A", "P2A"}
            assert point["P1A"]["mean"] == pytest.approx(100 * judged["per_criterion"]["P1A"]["win_rate"])
            assert 0 <= point["P2A"]["ci_low"] <= point["P2A"]["mean"] <= point["P2A"]["ci_high"] <= 100
    assert "Win rate % against the base model's answers" in (run / "report" / "report.md").read_text()


def test_unknown_stage_is_an_error(pipeline_recipe):
    recipe, _ = pipeline_recipe
    result = runner.invoke(app, ["run", str(recipe), "--only", "trian-rm"])
    assert result.exit_code == 2
    assert "unknown stage 'trian-rm' (did you mean 'train-rm'?)" in result.output


@pytest.mark.slow
def test_adding_a_preference_dimension_costs_its_experts_only(pipeline_recipe, monkeypatch):
    """A finished run gets a new dimension (two recipe-defined preferences, judged by an LLM judge):
    the rerun trains only the new reward models and experts, keeps every old unit by its
    fingerprint, and the combinations double."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai_server import FakeOpenAIServer

    path, run = pipeline_recipe
    monkeypatch.setenv("RLPHF_TEST_JUDGE_KEY", "sk-test-not-a-real-key")
    with FakeOpenAIServer() as server:
        recipe = yaml.safe_load(path.read_text())
        recipe["preferences"] = {"use": ["P2A", "P2B"]}
        recipe["evaluation"] = {"baselines": ["base", "prompted"], "sweep": None}
        recipe["annotate"]["judge"] = "openai"
        recipe["judge"].update(backend="openai", openai={"base_url": server.base_url,
                                                        "api_key_env": "RLPHF_TEST_JUDGE_KEY"})
        path.write_text(yaml.safe_dump(recipe))
        first = runner.invoke(app, ["run", str(path)])
        assert first.exit_code == 0, first.output
        old = _mtimes(run)
        assert sorted(p.name for p in (run / "soups").iterdir()) == ["P2A", "P2B"]

        recipe["preferences"] = {"use": ["P2A", "P2B", "P4A", "P4B"], "define": [
            {"id": "P4A", "alias": "formal", "dimension": "register", "prompt": "Answer formally.",
             "criterion": "Which response is more formal?"},
            {"id": "P4B", "alias": "casual", "dimension": "register", "prompt": "Answer casually.",
             "criterion": "Which response is more casual?"}]}
        path.write_text(yaml.safe_dump(recipe))
        second = runner.invoke(app, ["run", str(path)])
        assert second.exit_code == 0, second.output

    new = _mtimes(run)
    kept = [p for p in old if p.name != "judge_cache.jsonl"  # the new preferences' verdicts are appended
            and p.relative_to(run).parts[0] in ("rollouts.jsonl", "annotations", "rm", "policy")
            or p.relative_to(run).parts[:2] in (("generations", "experts"), ("generations", "base"))
            or p.relative_to(run).parts[:3] == ("generations", "prompted", "P2A.jsonl")]
    assert kept and all(new[p] == old[p] for p in kept), [p for p in kept if new[p] != old[p]]
    for pref in ("P4A", "P4B"):
        assert (run / "rm" / pref / "adapter_model.safetensors").exists()
        assert (run / "policy" / pref / "adapter_model.safetensors").exists()
        assert (run / "generations" / "experts" / f"{pref}.jsonl").exists()
    combos = ["P2A+P4A", "P2A+P4B", "P2B+P4A", "P2B+P4B"]
    assert sorted(p.name for p in (run / "soups").iterdir() if "+" in p.name) == combos
    assert all((run / "generations" / "psoups" / f"{c}.jsonl").exists() for c in combos)
    trained = [e["stage"] for e in (json.loads(line) for line in (run / "events.jsonl").read_text().splitlines())
               if e["event"] == "done" and e["stage"].startswith(("train-rm/", "train-policy/"))]
    assert sorted(trained) == sorted(["train-rm/P2A", "train-rm/P2B", "train-policy/P2A", "train-policy/P2B",
                                      "train-rm/P4A", "train-rm/P4B", "train-policy/P4A", "train-policy/P4B"])


@pytest.mark.slow
def test_a_finished_run_reruns_from_its_recipe_and_notices_a_replaced_output(tmp_path, tiny_random_model):
    train = write_prompts(tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": f"Tell me about {w}."}
                                                     for i, w in enumerate("sun rain snow wind tide rock".split())])
    recipe = {"name": "record", "run_dir": str(tmp_path / "run"), "model": {"name": str(tiny_random_model)},
              "preferences": {"use": ["P1A", "P2A"]},
              "data": {"train_prompts": str(train), "eval_prompts": str(train), "max_eval_prompts": 3},
              "generate": {"max_new_tokens": 8, "batch_size": 16},
              "train_rm": {"trl": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 48}},
              "train_policy": {"rloo": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 2,
                                        "max_completion_length": 8}},
              "judge": {"bootstrap_samples": 20}, "evaluation": {"baselines": ["base"], "sweep": None}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0
    assert json.loads((run / "policy" / "P2A" / "training.json").read_text())["settings"]["trainer"]["fields"][
        "max_steps"] == 1
    before = mtimes(run)
    again = runner.invoke(app, ["run", str(run / "recipe.yaml")])  # the record runs as is
    assert again.exit_code == 0, again.output
    assert {p: t for p, t in mtimes(run).items() if p.name != "events.jsonl"} == {
        p: t for p, t in before.items() if p.name != "events.jsonl"}

    # A stage command replaces a policy (with --force and its own settings): the run's recipe stays,
    # and the next `rlphf run` keeps that policy and recomputes what depends on it, saying so.
    recipe_text = (run / "recipe.yaml").read_text()
    forced = runner.invoke(app, ["train-policy", "--pref", "P2A", "--run-dir", str(run), "--recipe", str(path),
                                 "--set", "train_policy.rloo.max_steps=2", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (run / "recipe.yaml").read_text() == recipe_text
    assert json.loads((run / "policy" / "P2A" / "training.json").read_text())["steps"] == 2
    policy = mtimes(run / "policy")
    rerun = runner.invoke(app, ["run", str(path)])
    assert rerun.exit_code == 0, rerun.output
    assert "policy/P2A changed since `rlphf run` made it" in rerun.output.replace("\n", " ")
    assert mtimes(run / "policy") == policy  # kept, not retrained
    after = mtimes(run)
    assert after[run / "soups" / "P1A+P2A" / "soup.json"] != before[run / "soups" / "P1A+P2A" / "soup.json"]
    assert after[run / "judgments" / "psoups_vs_base.json"] != before[run / "judgments" / "psoups_vs_base.json"]
    assert after[run / "rm" / "P2A" / "adapter_model.safetensors"] == before[run / "rm" / "P2A" / "adapter_model.safetensors"]
    assert [e["stage"] for e in RunDir(run).events() if e["event"] == "changed"] == ["train-policy/P2A"]


def test_dry_run_counts_the_paid_judge_requests_of_each_stage(tmp_path):
    """Before anything is made, from each unit's own job: stand-ins for the rollouts and answers, every
    response at its longest. smoke: 8 prompts x (3 preferences + the general criterion) to annotate."""
    result = runner.invoke(app, ["run", "smoke", "--dry-run", "--run-dir", str(tmp_path / "run"),
                                 "--set", "annotate.judge=openai", "--set", "judge.openai.base_url=http://127.0.0.1:9/v1",
                                 "--set", "judge.openai.price.input=1", "--set", "judge.openai.price.output=2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("# annotate:") or line.startswith("# judge:")]
    assert lines[0].startswith("# annotate: 32 verdicts, 0 cached; 32 requests to send: about ")
    assert "at $1 / $2 per million tokens (inputs not made yet" in lines[0]
    assert lines[1] == "# judge: no paid judge requests"  # the rubric judges
    assert not (tmp_path / "run").exists()


def test_dry_run_counts_the_judged_pareto_points(tmp_path):
    """With an LLM judge each Pareto point is judged against the base model on both criteria: smoke's
    8 prompts x 3 methods x 2 weights x 2 criteria more verdicts, counted before any answer exists."""
    def judge_line(*extra):
        result = runner.invoke(app, ["run", "smoke", "--dry-run", "--run-dir", str(tmp_path / "run"),
                                     "--set", "judge.backend=openai", "--set", "judge.openai.base_url=http://127.0.0.1:9/v1",
                                     "--set", "judge.openai.price.input=1", "--set", "judge.openai.price.output=2", *extra])
        assert result.exit_code == 0, result.output
        line = next(x for x in result.output.splitlines() if x.startswith("# judge:"))
        return int(line.split()[2])

    without = judge_line()
    assert judge_line("--set", 'evaluation.pareto={"prefs": ["P1A", "P2A"], "weights": [0, 1]}') == without + 8 * 3 * 2 * 2
