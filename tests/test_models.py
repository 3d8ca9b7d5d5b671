"""Models (rlphf_cli.models): the embedded tiny model (shipped data, the builder, the cache, and, slow,
the built model's quality), the tiny-random smoke model, built-in model names."""

from __future__ import annotations

import collections
import json
import statistics
import threading
import time
from pathlib import Path

import pytest
from helpers import one_error_line
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.errors import RecipeError
from rlphf_cli.models import BUILTIN_MODELS, corpus, resolve_model, tiny, tiny_random
from rlphf_cli.pipeline import plan
from rlphf_cli.recipe import load_recipe
from rlphf_cli.runs import read_jsonl

runner = CliRunner()


def shipped(name: str) -> list[dict]:
    return [json.loads(line) for line in (corpus.DATA_DIR / f"{name}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Shipped data


def test_prompt_sets_meet_the_bars():
    train, evaluation = shipped("tiny-train"), shipped("tiny-eval")
    assert len(train) >= 300 and len({r["topic"] for r in train}) >= 100
    assert len(evaluation) >= 60
    for record in train + evaluation:
        assert set(record) == {"id", "prompt", "topic", "keyword"}
        assert record["keyword"].lower() in record["prompt"].lower()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert len({r["id"] for r in train + evaluation}) == len(train) + len(evaluation)
    assert {r["topic"] for r in evaluation} <= {r["topic"] for r in train}  # held-out phrasings, known topics


def test_shipped_prompt_files_are_generated_from_the_topics(tmp_path):
    train, evaluation = corpus.write_prompt_files(tmp_path)
    assert train.read_text() == (corpus.DATA_DIR / "tiny-train.jsonl").read_text()
    assert evaluation.read_text() == (corpus.DATA_DIR / "tiny-eval.jsonl").read_text()


def test_topics_open_with_the_prompt_phrase():
    for topic in corpus.load_topics():
        assert len(topic.simple) == len(topic.technical) == 3
        for register, sentences in (("simple", topic.simple), ("technical", topic.technical)):
            assert sentences[0].startswith(corpus.LEAD_INS[register] + topic.topic + " ")
            assert topic.keyword.lower() in sentences[0].lower()


def test_styles_vary_independently_and_a_minority_carries_preference_prompts():
    from rlphf_cli.judges.rubric import friendliness, reading_grade

    examples = corpus.build_sft_examples(corpus.load_topics(), [
        {"prompt": r["prompt"], "topic": r["topic"]} for r in shipped("tiny-train")])
    plain = [e for e in examples if not e["preferences"]]
    assert 0.2 <= 1 - len(plain) / len(examples) <= 0.3
    combos = collections.Counter((e["style"]["register"], e["style"]["length"], e["style"]["tone"]) for e in plain)
    expected = len(plain) / 18
    assert len(combos) == 18 and all(0.7 * expected < n < 1.3 * expected for n in combos.values())

    sample = plain[:600]

    def mean(measure, key, value):
        return statistics.mean(measure(e["response"]) for e in sample if e["style"][key] == value)

    assert mean(reading_grade, "register", "technical") - mean(reading_grade, "register", "simple") > 6
    words = lambda text: len(text.split())  # noqa: E731
    assert mean(words, "length", 3) - mean(words, "length", 1) > 15
    assert mean(friendliness, "tone", "friendly") > 1.0 > 0 > -0.5 > mean(friendliness, "tone", "unfriendly")

    prompted = [e for e in examples if "P2A" in e["preferences"]]
    follows = sum(e["style"]["length"] == 1 for e in prompted) / len(prompted)
    assert 0.7 < follows < 0.95  # usually, not always: prompting has a weak effect


# --------------------------------------------------------------------------------------------
# Builder and cache

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 400, "plain_per_prompt": 1, "prompted_per_prompt": 0}


@pytest.mark.slow  # three small builds: ~15 s on an idle machine
def test_build_is_deterministic_for_a_seed(tmp_path):
    first = tiny.build_tiny_model(tmp_path / "a", seed=0, max_steps=2, **SMALL)
    second = tiny.build_tiny_model(tmp_path / "b", seed=0, max_steps=2, **SMALL)
    other = tiny.build_tiny_model(tmp_path / "c", seed=1, max_steps=2, **SMALL)
    assert first["weights_sha256"] == second["weights_sha256"] != other["weights_sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first["steps"] == 2 and first["final_loss"] > 0
    assert tiny.read_build_info(tmp_path / "a")["fingerprint"] != tiny.build_fingerprint(0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def fake_builder(calls: list):
    def build(out, seed=0, progress=None, **kwargs):
        calls.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        info = {"params": 1, "size_mb": 0.1, "final_loss": 0.5, "steps": 1, "examples": 1, "build_seconds": 0.3,
                "weights_sha256": "0" * 64, "fingerprint": tiny.build_fingerprint(seed)}
        (out / tiny.BUILD_INFO).write_text(json.dumps(info))
        return info

    return build


def test_ensure_builds_once_under_concurrency_and_rebuilds_when_the_builder_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPHF_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_model", fake_builder(calls))
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny_model())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert results[0].parent == tmp_path and results[0].name.startswith("tiny-")
    assert tiny.ensure_tiny_model() == results[0] and len(calls) == 1  # cached

    monkeypatch.setitem(tiny.TRAIN_CONFIG, "epochs", 99)
    changed = tiny.ensure_tiny_model()
    assert changed != results[0] and len(calls) == 2


def test_cli_tiny_model_prints_folder_size_and_loss(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_model", fake_builder(calls))
    out = tmp_path / "model"
    result = runner.invoke(app, ["tiny-model", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in (str(out), "parameters", "MB", "final loss", "0.5000"):
        assert text in result.output, result.output
    result = runner.invoke(app, ["tiny-model", "--out", str(out)])
    assert "cached" in result.output and len(calls) == 1


def test_cli_tiny_model_refuses_to_clobber_a_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["tiny-model", "--out", str(tmp_path)])
    one_error_line(result, "not a tiny model")
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# The built model (slow: built once into $RLPHF_HOME, cached after)


@pytest.mark.slow
def test_tiny_model_loads_with_the_auto_classes(tiny_model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlphf_cli.runs import file_sha256

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenizer.padding_side == "left" and tokenizer.eos_token == "<|end|>" and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 1e7
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    batch = tokenizer(["Explain gravity.", "Hi"], return_tensors="pt", padding=True)
    assert scorer(**batch).logits.shape == (2, 1)
    info = tiny.read_build_info(tiny_model)
    assert info["weights_sha256"] == file_sha256(Path(tiny_model) / "model.safetensors")
    assert info["fingerprint"] == tiny.build_fingerprint(0) and info["final_loss"] < 1.0


@pytest.mark.slow
def test_tiny_model_quality_bar(tiny_model, tmp_path):
    """T=1 on the held-out prompts: on topic >= 80%, and every preference has winners and losers."""
    from helpers import generate_to

    from rlphf_cli.data import load_prompts
    from rlphf_cli.judges.rubric import friendliness, reading_grade, words
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.runs import read_jsonl

    recipe = load_recipe(None, [], {"run_dir": str(tmp_path / "run")})
    prompts = load_prompts("builtin:tiny-eval")
    summary = generate_to(recipe, prompts, tmp_path / "eval.jsonl", num_samples=2)
    records = read_jsonl(summary["path"])
    pairs = [(r["keyword"], text) for r in records for text in r["responses"]]
    on_topic = sum(keyword.lower() in text.lower() for keyword, text in pairs) / len(pairs)
    texts = [text for _, text in pairs]
    counts = [len(words(t)) for t in texts]
    grades = [reading_grade(t) for t in texts]
    tones = [friendliness(t) for t in texts]
    print(f"on topic {on_topic:.2f}; words {statistics.mean(counts):.1f} +- {statistics.pstdev(counts):.1f}; "
          f"grade {statistics.mean(grades):.1f} +- {statistics.pstdev(grades):.1f}; "
          f"friendliness {statistics.mean(tones):.2f} +- {statistics.pstdev(tones):.2f}")
    assert on_topic >= 0.8
    assert summary["distinct_fraction"] >= 0.95
    assert statistics.pstdev(counts) > 8 and statistics.pstdev(grades) > 3 and statistics.pstdev(tones) > 0.8

    def share(values, test):
        return sum(map(test, values)) / len(values)

    # Winners and losers for each of the six preferences: at least one answer in seven on each side
    # (measured: under 20 words 18%, over 35 words 25%; grade < 6 52%, > 11 26%; tone 34% / 37%).
    assert share(grades, lambda g: g < 6) > 0.15 and share(grades, lambda g: g > 11) > 0.15
    assert share(counts, lambda n: n < 20) > 0.15 and share(counts, lambda n: n > 35) > 0.15
    assert share(tones, lambda f: f > 1.0) > 0.15 and share(tones, lambda f: f < -0.3) > 0.15
    # The recipe's answer length leaves room: a sampled answer that runs on to the limit is rare (the
    # model's own answers end by ~85 tokens; a build on another machine's floating-point sums may
    # let one in a hundred run on).
    lengths = [n for r in records for n in r["response_tokens"]]
    assert share(lengths, lambda n: n >= recipe.generate.max_new_tokens) < 0.01


@pytest.mark.slow
def test_cli_tiny_model_reports_the_cached_model(tiny_model):
    result = runner.invoke(app, ["tiny-model"])
    assert result.exit_code == 0, result.output
    assert "cached" in result.output and str(tiny_model) in result.output


def test_fixture_model_loads_with_auto_classes(tiny_random_model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model)
    AutoModelForCausalLM.from_pretrained(tiny_random_model)
    AutoModelForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi\n<|assistant|>\n"


def test_tiny_random_builds_deterministically_into_its_cache(home, tmp_path):
    path = Path(resolve_model("tiny-random"))
    assert path.parent == home and path.name == f"tiny-random-{tiny_random.build_fingerprint()[:12]}"
    info = json.loads((path / "build.json").read_text())
    assert info["random_weights"] and info["params"] < 100_000
    assert resolve_model("tiny-random") == str(path)  # cached: no rebuild
    again = tiny_random.build_tiny_random_model(tmp_path / "again")
    assert again["weights_sha256"] == info["weights_sha256"]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nHi\n<|assistant|>\n" and tokenizer.eos_token == "<|end|>"


def test_builtin_models_are_known_to_recipes_and_plans(home):
    assert {"tiny", "tiny-random"} <= set(BUILTIN_MODELS.names())
    recipe = load_recipe(None, ["model.name=tiny-random"])  # no file of that name: still valid
    assert plan(recipe)[0].name == "tiny-model" and "tiny-random" in plan(recipe)[0].description
    assert plan(load_recipe(None, ["model.name=some-org/some-model"]))[0].name == "rollouts"
    with pytest.raises(RecipeError, match="model.name: file not found"):
        load_recipe(None, ["model.name=./no-such-folder"])


def test_generate_takes_model_tiny_random(home, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Explain rain."}\n{"id": "b", "prompt": "What is a star?"}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["generate", "--model", "tiny-random", "--prompts", str(prompts), "--out", str(out),
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b"]
