"""`rlphf generate` and rlphf_cli.generation on the random fixture model (seconds): records, seeding per
prompt, resume, interruption, sample counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import generate_to, generator_for, one_error_line
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.errors import InputError
from rlphf_cli.recipe import load_recipe
from rlphf_cli.runs import read_jsonl

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"id": f"p{i}", "instruction": text}
    for i, text in enumerate([
        "Explain photosynthesis.", "What is a volcano?", "Describe gravity in simple words.",
        "Tell me about black holes and why nothing escapes them.", "Hi.",
    ])
]


def recipe_for(model: Path, run: Path, **overrides):
    return load_recipe(None, [], {"model.name": str(model), "run_dir": str(run), "generate.max_new_tokens": 8,
                                  **overrides})


def make_adapter(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A random model of another shape: adapters made for it must be refused."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    return out


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Library


def test_generate_file_records_match_the_shared_format(tiny_random_model, tmp_path):

    recipe = recipe_for(tiny_random_model, tmp_path / "run")
    out = tmp_path / "out.jsonl"
    seen = []
    summary = generate_to(recipe, PROMPTS, out, num_samples=2, progress=lambda *a: seen.append(a))
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]  # prompt order, whatever the batching
    for record, prompt in zip(records, PROMPTS, strict=True):
        assert set(record) >= {"id", "instruction", "preferences", "combo", "system", "response", "responses",
                               "prompt_tokens", "response_tokens", "sampling"}
        assert record["instruction"] == prompt["instruction"]
        assert record["preferences"] == [] and record["combo"] == "" and record["system"] == "base"
        assert len(record["responses"]) == 2 and record["response"] == record["responses"][0]
        assert len(set(record["responses"])) == 2
        assert all(0 <= n <= 8 for n in record["response_tokens"])
        assert record["sampling"]["temperature"] == 1.0 and record["sampling"]["max_new_tokens"] == 8
    # Longer prompts have more tokens: the mapping back from length-sorted batches is right.
    assert records[3]["prompt_tokens"] > records[4]["prompt_tokens"]
    assert summary["prompts"] == 5 and summary["generated"] == 5 and summary["distinct_fraction"] == 1.0
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert seen[0][1] == 0 and seen[-1][1:3] == (5, 5)


def test_seed_and_greedy(tiny_random_model, tmp_path):
    import dataclasses


    gen = generator_for(recipe_for(tiny_random_model, tmp_path))
    texts = [gen.prompt_text(p["instruction"]) for p in PROMPTS]
    default = gen.sampling

    def responses(**sampling):
        gen.sampling = dataclasses.replace(default, **sampling)
        return [r[0][0] for r in gen.generate(texts)[0]]

    assert responses(seed=3) == responses(seed=3)
    assert responses(seed=3) != responses(seed=4)
    assert responses(temperature=0, seed=1) == responses(temperature=0, seed=2)


def test_resume_skips_done_prompts_and_drops_a_torn_line(tiny_random_model, tmp_path):

    recipe = recipe_for(tiny_random_model, tmp_path / "run")
    out = tmp_path / "out.jsonl"
    generate_to(recipe, PROMPTS[:2], out)
    first = read_jsonl(out)
    out.write_text(out.read_text() + '{"id": "p2", "instruc')  # killed mid-write
    summary = generate_to(recipe, PROMPTS, out, resume=True)
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    assert records[:2] == first
    assert summary["resumed"] == 2 and summary["generated"] == 3
    assert len(out.read_text().splitlines()) == 5


def test_resume_refuses_a_file_of_another_system(tiny_random_model, tmp_path):

    recipe = recipe_for(tiny_random_model, tmp_path / "run")
    out = tmp_path / "out.jsonl"
    generate_to(recipe, PROMPTS[:1], out, prefs="P2A")
    with pytest.raises(InputError, match="combination"):
        generate_to(recipe, PROMPTS, out, prefs="P2B", resume=True)


def test_preference_prompts_are_appended(tiny_random_model, tmp_path):

    recipe = recipe_for(tiny_random_model, tmp_path / "run")
    gen = generator_for(recipe)
    plain = generate_to(recipe, PROMPTS[:2], tmp_path / "a.jsonl", generator=gen)
    with_prefs = generate_to(recipe, PROMPTS[:2], tmp_path / "b.jsonl", prefs="concise,P3A", generator=gen)
    a, b = read_jsonl(plain["path"]), read_jsonl(with_prefs["path"])
    assert b[0]["preferences"] == ["P2A", "P3A"] and b[0]["combo"] == "P2A+P3A"
    assert b[0]["instruction"] == a[0]["instruction"] == PROMPTS[0]["instruction"]
    assert b[0]["prompt_tokens"] > a[0]["prompt_tokens"] + 10
    assert "concise and to the point" in gen.prompt_text("x", recipe.preference_set().resolve("P2A"))


def test_tulu_prompt_format(tiny_random_model, tmp_path):

    gen = generator_for(recipe_for(tiny_random_model, tmp_path, **{"model.prompt_format": "tulu"}))
    prefs = load_recipe().preference_set().resolve("P1A")
    assert gen.prompt_text("Explain X.", prefs) == f"<|user|>\nExplain X. {prefs[0].prompt}\n<|assistant|>\n"


def test_samples_are_resampled_until_distinct(tiny_random_model, tmp_path, monkeypatch):

    gen = generator_for(recipe_for(tiny_random_model, tmp_path))
    answers = iter(["same", "same", "same", "new"])

    def fake_decode(batch_ids, seeds):
        assert len(seeds) == len(batch_ids)
        return [(next(answers), 1) for _ in batch_ids], 2

    monkeypatch.setattr(gen, "_decode", fake_decode)
    results, _ = gen.generate(["one prompt"], num_samples=2)
    assert [text for text, _ in results[0]] == ["same", "new"]


def test_adapter_is_merged_before_decoding(tiny_random_model, tmp_path):

    adapter = make_adapter(tiny_random_model, tmp_path / "my-lora", seed=5)
    recipe = recipe_for(tiny_random_model, tmp_path, **{"generate.temperature": 0})
    merged = generator_for(recipe, adapter=adapter)
    unmerged = generator_for(recipe, adapter=adapter, merge=False)
    base = generator_for(recipe)
    assert merged.system == "adapter:my-lora"
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    texts = [merged.prompt_text(p["instruction"]) for p in PROMPTS]
    out_merged = merged.generate(texts)[0]
    assert out_merged == unmerged.generate(texts)[0]
    assert out_merged != base.generate(texts)[0]


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_rollouts_by_default(tiny_random_model, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(run),
                                 "--limit", "3", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(run / "rollouts.jsonl")
    assert len(records) == 3 and all(len(r["responses"]) == 2 for r in records)  # annotate.num_samples
    assert records[0]["id"].startswith("train-") and records[0]["topic"]
    assert (run / "recipe.yaml").is_file()
    assert "rollouts.jsonl" in result.output


def test_cli_combos_all_writes_one_file_per_combination(tiny_random_model, tmp_path):
    out = tmp_path / "gens"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(tmp_path / "run"),
                                 "--combos", "all", "--num-samples", "2", "--limit", "2", "--max-new-tokens", "5",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.glob("*.jsonl"))
    assert len(files) == 8 and "P1A+P2A+P3A.jsonl" in files and "P1B+P2B+P3B.jsonl" in files
    for file in out.glob("*.jsonl"):
        records = read_jsonl(file)
        assert len(records) == 2 and records[0]["combo"] == file.stem
        assert records[0]["id"].startswith("eval-")  # evaluation prompts by default
        assert all(len(set(r["responses"])) == 2 for r in records)


def test_cli_prompts_file_with_instruction_and_input(tiny_random_model, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"instruction": "Summarize.", "input": "A long text."},
                                   {"instruction": "Greet me."}]))
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(tmp_path / "run"),
                                 "--prompts", str(prompts), "--prefs", "P1B", "--temperature", "0",
                                 "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert records[0]["instruction"] == "Summarize.\n\nA long text." and records[0]["sampling"]["temperature"] == 0


def test_cli_adapters_with_weights_make_a_soup(tiny_random_model, tmp_path):
    pytest.importorskip("rlphf_cli.merging")
    a = make_adapter(tiny_random_model, tmp_path / "a", seed=1)
    b = make_adapter(tiny_random_model, tmp_path / "b", seed=2)
    out = tmp_path / "soup.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(tmp_path / "run"),
                                 "--adapters", f"{a},{b}", "--weights", "0.7,0.3", "--limit", "2",
                                 "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_jsonl(out)[0]["system"] == "soup:a=0.7+b=0.3"


def test_cli_soup_of_the_runs_policies(tiny_random_model, tmp_path):
    pytest.importorskip("rlphf_cli.merging")

    run = tmp_path / "run"
    make_adapter(tiny_random_model, run / "policy" / "P2A", seed=1)
    make_adapter(tiny_random_model, run / "policy" / "P3A", seed=2)
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(run),
                                 "--soup", "concise=0.5,friendly=0.5", "--prefs", "P2A,P3A", "--limit", "2",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(run / "generations" / "soup-P2A+P3A" / "P2A+P3A.jsonl")
    assert records[0]["system"] == "soup:P2A+P3A" and records[0]["preferences"] == ["P2A", "P3A"]

    # Written the way serve and merge take it, without --prefs: prompted with the soup's preferences.
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(run),
                                 "--soup", "friendly=0.3,concise=0.7", "--limit", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(run / "generations" / "soup-P2A=0.7+P3A=0.3" / "P2A+P3A.jsonl")
    assert records[0]["preferences"] == ["P2A", "P3A"] and records[0]["system"] == "soup:P2A=0.7+P3A=0.3"

    # The merged soup decodes like peft's unmerged soup adapter, and not like the base model.
    recipe = recipe_for(tiny_random_model, run, **{"generate.temperature": 0})
    merged = generator_for(recipe, soup="concise,friendly")
    unmerged = generator_for(recipe, soup="concise,friendly", merge=False)
    texts = [merged.prompt_text(p["instruction"]) for p in PROMPTS]
    assert merged.generate(texts)[0] == unmerged.generate(texts)[0]
    assert merged.generate(texts)[0] != generator_for(recipe).generate(texts)[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompts", "missing.jsonl"], "missing.jsonl: file not found"),
        (["--prompts", "EMPTY"], "empty.jsonl: empty file"),
        (["--prefs", "P2A,concize"], "unknown preference 'concize' (did you mean 'concise'?)"),
        (["--adapters", "A,B", "--weights", "0.5"], "1 weights for 2 adapters"),
        (["--soup", "concise=0.5,friendly=0.5"], "make it with: rlphf train-policy --prefs concise"),
        (["--soup", "concise=half"], "weight 'half' of 'concise' is not a number"),
        (["--adapter", "OTHER"], "made for another base model"),
        (["--adapter", "NOT_ADAPTER"], "not a PEFT adapter folder"),
        (["--adapter", "nowhere"], "no such adapter folder"),
        (["--prefs", "P1A", "--combos", "all"], "give one"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_random_model, other_base, tmp_path, args, expected):
    run = tmp_path / "run"
    out = tmp_path / "out.jsonl"
    fill = {"EMPTY": str(write_prompts(tmp_path / "empty.jsonl", [])), "NOT_ADAPTER": str(tmp_path),
            "A": str(tmp_path / "a"), "B": str(tmp_path / "b")}
    if "OTHER" in args:
        fill["OTHER"] = str(make_adapter(other_base, tmp_path / "other-lora", seed=0))
    args = [fill.get(a, a) for a in args]
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(run),
                                 "--out", str(out), *args])
    line = one_error_line(result)
    assert expected in line, line
    assert not out.exists()
    assert not (run / "generations").exists() and not (run / "rollouts.jsonl").exists()


def test_greedy_without_a_sample_count_just_works_with_one_sample(tiny_random_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Explain gravity."}\n{"prompt": "Hi."}\n')
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--temperature", "0", "--prompts", str(prompts), "--out", str(out),
                                 "--model", str(tiny_random_model), "--max-new-tokens", "4",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "greedy decoding (temperature 0): one response per prompt" in result.output
    from rlphf_cli.runs import read_jsonl

    assert [len(r["responses"]) for r in read_jsonl(out)] == [1, 1]


@pytest.mark.parametrize(("args", "expected"), [
    (["--temperature", "0", "--num-samples", "3", "--prefs", "P2A"], "--num-samples 3 with --temperature 0"),
    (["--set", "generate.temperature=0", "--num-samples", "2"], "--num-samples 2 with --set generate.temperature 0"),
    (["--temperature", "0", "--set", "generate.num_samples=2"], "--set generate.num_samples 2 with --temperature 0"),
])
def test_an_explicit_sample_count_with_greedy_decoding_is_one_line(tmp_path, args, expected):
    one_error_line(runner.invoke(app, ["generate", *args, "--run-dir", str(tmp_path / "run")]), expected)
    assert not (tmp_path / "run").exists()


def test_sampling_is_seeded_per_prompt_not_per_batch(tiny_random_model, tmp_path):
    from helpers import generator_for

    gen = generator_for(recipe_for(tiny_random_model, tmp_path, **{"generate.max_new_tokens": 12}))
    texts = [gen.prompt_text(p["instruction"]) for p in PROMPTS]
    together = gen.generate(texts, num_samples=2)[0]
    gen.batch_size = 2  # one prompt (two samples) per batch
    alone = gen.generate(texts, num_samples=2)[0]
    subset = gen.generate(texts[2:], num_samples=2)[0]
    assert together == alone and subset == together[2:]
    assert len({s for r in together for s, _ in r}) > 5  # and they are samples, not one answer


def test_resume_refuses_other_settings_naming_the_difference(tiny_random_model, other_base, tmp_path):  # noqa: F811
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "o.jsonl"
    base = ["generate", "--model", str(tiny_random_model), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "4", "--run-dir", str(tmp_path / "run")]
    assert runner.invoke(app, [*base, "--limit", "3"]).exit_code == 0
    before = out.read_text()
    adapter = make_adapter(tiny_random_model, tmp_path / "lora", seed=3)
    for extra, difference in [
        (["--temperature", "0.5"], "sampling.temperature 1.0, not 0.5"),
        (["--prefs", "P2A"], "system 'base', not 'prompted'"),
        (["--prefs", "P2A", "--system", "base"], "combination '', not 'P2A'"),
        (["--adapter", str(adapter), "--system", "base"], "adapters 'none', not '"),
        (["--seed", "4"], "sampling.seed 0, not 4"),
        (["--model", str(other_base)], f"model '{tiny_random_model}', not '{other_base}'"),
        (["--num-samples", "3"], "samples per prompt 2, not 3"),  # rollouts: annotate.num_samples
    ]:
        one_error_line(runner.invoke(app, [*base, "--resume", *extra]), f"{out}: id 'p0' was written with {difference}",
                       exact=True)
    assert out.read_text() == before

    # A resume with fewer prompts keeps the records it does not regenerate.
    result = runner.invoke(app, [*base, "--resume", "--limit", "2"])
    assert result.exit_code == 0 and "kept 1 records" in result.output, result.output
    assert out.read_text() == before


def test_sigint_during_the_last_batch_is_an_interruption_not_a_success(tiny_random_model, tmp_path, monkeypatch):
    from rlphf_cli.generation import Generator

    original = Generator.generate

    def interrupted_after_the_last_batch(self, texts, num_samples=1, on_batch=None):
        original(self, texts, num_samples, on_batch)
        raise KeyboardInterrupt  # Ctrl-C while the last batch was being written

    monkeypatch.setattr(Generator, "generate", interrupted_after_the_last_batch)
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--prompts",
                                 str(write_prompts(tmp_path / "p.jsonl", PROMPTS)), "--out", str(out),
                                 "--max-new-tokens", "3", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 130 and "wrote" not in result.output, result.output
    assert "5 records kept, 5 of the 5 prompts asked for; all written, nothing to resume" in result.output
    assert len(read_jsonl(out)) == 5


@pytest.mark.slow
def test_a_real_sigint_then_the_printed_resume_command_equals_an_uninterrupted_run(tiny_random_model, tmp_path):
    import shlex

    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Tell me about thing {i}."}
                                                   for i in range(10)])
    args = ["generate", "--model", str(tiny_random_model), "--prompts", str(prompts), "--num-samples", "2",
            "--max-new-tokens", "16", "--min-new-tokens", "16", "--batch-size", "2", "--run-dir", str(tmp_path / "run")]
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "--out", str(whole)]).exit_code == 0

    cut = tmp_path / "cut.jsonl"
    # Background jobs of a non-interactive shell ignore SIGINT; the child must not inherit that.
    child = subprocess.Popen([sys.executable, "-m", "rlphf_cli", *args, "--out", str(cut)],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and (not cut.exists() or len(cut.read_text().splitlines()) < 3):
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stdout + stderr
    kept = len(read_jsonl(cut))
    assert 3 <= kept < 10, stderr
    assert f"{cut}: {kept} records kept, {kept} of the 10 prompts asked for" in stderr, stderr
    assert "wrote" not in stdout
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: rlphf "))
    resumed = runner.invoke(app, shlex.split(command.removeprefix("resume with: rlphf ")))
    assert resumed.exit_code == 0, resumed.output
    assert read_jsonl(cut) == read_jsonl(whole)  # record for record


# --------------------------------------------------------------------------------------------
# Decoding-time mixing (--compose logits)


@pytest.fixture(scope="module")
def experts(tiny_random_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return make_adapter(tiny_random_model, root / "a", seed=11), make_adapter(tiny_random_model, root / "b", seed=12)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_mix_with_all_weight_on_one_expert_or_two_copies_of_it_is_that_expert(tiny_random_model, tmp_path, experts,
                                                                               temperature):
    import shutil

    a, b = experts
    copy = tmp_path / "a-copy"
    shutil.copytree(a, copy)
    recipe = recipe_for(tiny_random_model, tmp_path, **{"generate.temperature": temperature, "generate.top_k": 20})
    logits = recipe_for(tiny_random_model, tmp_path, **{"generate.temperature": temperature, "generate.top_k": 20,
                                                         "generate.compose": "logits"})
    expert = generator_for(recipe, adapter=a, merge=False)
    texts = [expert.prompt_text(p["instruction"]) for p in PROMPTS]
    want = expert.generate(texts)[0]
    one = generator_for(logits, soup=[(str(a), 1.0), (str(b), 0.0)])
    assert one.mix is None and one.generate(texts)[0] == want  # weight 0 dropped: the expert itself
    twice = generator_for(logits, soup=[(str(a), 0.5), (str(copy), 0.5)])
    assert twice.mix is not None and len(twice.mix[0]) == 2  # decodes through the mixing sampler
    assert twice.generate(texts)[0] == want  # 0.5 log p + 0.5 log p = log p, drawn from the same stream


def test_a_greedy_mix_takes_the_argmax_of_the_weighted_log_probabilities(tiny_random_model, tmp_path, experts):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a, b = experts
    recipe = recipe_for(tiny_random_model, tmp_path, **{"generate.temperature": 0, "generate.max_new_tokens": 1,
                                                        "generate.compose": "logits"})
    mix = generator_for(recipe, soup=[(str(a), 0.7), (str(b), 0.3)])
    assert mix.system == "mix:a=0.7+b=0.3"
    texts = [mix.prompt_text(p["instruction"]) for p in PROMPTS]
    firsts = mix.generate(texts)[0]
    for text, [(response, _)] in zip(texts, firsts, strict=True):
        ids = torch.tensor([mix.prompt_ids(text)])
        mixed = 0
        for folder, w in ((a, 0.7), (b, 0.3)):
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_random_model), str(folder))
            with torch.no_grad():
                mixed = mixed + w * torch.log_softmax(model.eval()(ids).logits[0, -1].float(), dim=-1)
        token = int(mixed.argmax())
        assert response == mix.tokenizer.decode([token], skip_special_tokens=True).strip()


def test_a_sampled_mix_is_seeded_per_row_and_differs_from_the_soup(tiny_random_model, tmp_path, experts):
    a, b = experts
    soup = [(str(a), 0.5), (str(b), 0.5)]
    logits = recipe_for(tiny_random_model, tmp_path, **{"generate.compose": "logits"})
    params = recipe_for(tiny_random_model, tmp_path)
    mix = generator_for(logits, soup=soup)
    texts = [mix.prompt_text(p["instruction"]) for p in PROMPTS]
    together = mix.generate(texts)[0]
    alone = [mix.generate([t])[0][0] for t in texts[:2]]
    assert together[:2] == alone  # a row's tokens do not depend on the rows beside it
    assert together != generator_for(params, soup=soup).generate(texts)[0]


def test_cli_compose_logits_writes_a_mix_and_merge_refuses_it(tiny_random_model, tmp_path, experts):
    a, b = experts
    out = tmp_path / "mix.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(tmp_path / "run"),
                                 "--adapters", f"{a},{b}", "--weights", "0.7,0.3", "--compose", "logits",
                                 "--limit", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = read_jsonl(out)[0]
    assert record["system"] == "mix:a=0.7+b=0.3" and record["weights"]["compose"] == "logits"
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(tmp_path / "run"),
                                 "--adapters", f"{a},{b}", "--weights", "0.7,-0.3", "--compose", "logits",
                                 "--out", str(tmp_path / "neg.jsonl")])
    one_error_line(result, "negative weight -0.3", "compose 'logits'")
    result = runner.invoke(app, ["generate", "--model", str(tiny_random_model), "--run-dir", str(tmp_path / "run"),
                                 "--adapter", str(a), "--compose", "logits", "--out", str(tmp_path / "one.jsonl")])
    one_error_line(result, "--compose logits mixes the experts of a soup")
    result = runner.invoke(app, ["merge", str(a), str(b), "--compose", "logits", "--out", str(tmp_path / "soup")])
    one_error_line(result, "compose 'logits'", "no adapter to merge")
    assert not (tmp_path / "soup").exists()
    result = runner.invoke(app, ["merge", str(a), str(b), "--merge-method", "logits", "--out", str(tmp_path / "soup")])
    one_error_line(result, "no adapter to merge")


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.95), (0.7, 0, 0.9), (1.0, 40, 0.9), (1.0, 20, 1.0),
                                                     (1.0, 0, 0.5), (1.3, 0, 1.0)])
def test_sampling_takes_the_tokens_transformers_warpers_would_leave(temperature, top_k, top_p):
    """rlphf's nucleus from a partial top-k (not a sort of a 262k vocabulary) and its seeded draw give
    the tokens that transformers' temperature/top-k/top-p warpers and the same draw give: peaked
    rows whose nucleus lies within the first candidates, flat ones whose nucleus does not, and a
    forbidden (-inf) token."""
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from rlphf_cli.sampling import NUCLEUS_CANDIDATES, draw, sample

    generator = torch.Generator().manual_seed(0)
    vocab = 4 * NUCLEUS_CANDIDATES * 8
    peaked = torch.randn(24, vocab, generator=generator) * 2
    peaked[:, :30] += 10 * torch.rand(24, 30, generator=generator)
    flat = torch.randn(8, vocab, generator=generator) * 0.05
    scores = torch.cat([peaked, flat])
    scores[0, 3] = float("-inf")
    u = torch.rand(len(scores), dtype=torch.float64, generator=generator)
    warped = scores / temperature
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = draw(warped, u)
    tokens = sample(scores, u, temperature, top_k, top_p)
    assert tokens.tolist() == expected.tolist()
    assert 3 not in tokens[:1].tolist()
