"""Shared fixtures. Everything is built offline in seconds: no hub, no network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURE_TEXTS = [
    "Explain photosynthesis. Plants use sunlight to make food from water and air.",
    "What is a volcano? A volcano is a mountain where hot melted rock comes out!",
    "Describe gravity in simple words. Gravity pulls things toward each other.",
    "The mitochondrion synthesises adenosine triphosphate via oxidative phosphorylation.",
    "Honestly, figure it out yourself. Whatever. It is obvious.",
    "Hey friend! Great question, haha, let me tell you all about it :)",
] * 20


@pytest.fixture
def single_torch_thread():
    """One torch thread in this process (in-process commands, merges), like the server's decode
    thread: tiny tensors gain nothing from threads, and on a shared machine threads stall each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_random_model(tmp_path_factory):
    """A random LlamaForCausalLM (hidden 32, 2 layers) + an offline BPE tokenizer, saved to a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlphf_cli.models.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-random")
    tokenizer = build_tokenizer(FIXTURE_TEXTS, vocab_size=320)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded tiny model (built once into $RLPHF_HOME, ~2-3 min on 2 cores; cached after)."""
    from rlphf_cli.models import resolve_model

    return resolve_model("tiny")



# --------------------------------------------------------------------------------------------
# rlphf serve: a run directory with LoRA policies on the tiny model, and a server on a free port

SERVE_PREFS = ("P1A", "P2A", "P2B", "P3A")


@pytest.fixture(scope="session")
def serve_run(tiny_model, tmp_path_factory):
    """A run directory with policy/<id>/ for P1A, P2A, P2B, P3A, and a profiles file."""
    run = tmp_path_factory.mktemp("serve-run")
    from lora_helpers import make_adapter

    # Random lora_B at std 0.05 on every linear layer: the tiny model's answers stay fluent, and
    # each policy's greedy answers are its own.
    for seed, pref in enumerate(SERVE_PREFS):
        make_adapter(tiny_model, run / "policy" / pref, seed=seed, std=0.05, targets="all-linear",
                     randomize=("lora_B",))
    (run / "profiles.yaml").write_text("users:\n  alice: {concise: 0.7, friendly: 0.3}\n  bob: P1A+P2A+P3A\n")
    return run


@pytest.fixture(scope="session")
def serve_recipe(serve_run):
    from rlphf_cli.recipe import load_recipe

    return load_recipe(None, [], {"run_dir": str(serve_run), "generate.max_new_tokens": 48})


@pytest.fixture(scope="session")
def served(serve_recipe, serve_run):
    """`rlphf serve` (transformers backend) in this process on a free port: .url, .server, .backend."""
    from types import SimpleNamespace

    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.serving.server import ServerThread, build_server

    server = build_server(serve_spec(serve_recipe), profiles=serve_run / "profiles.yaml", max_batch=16, max_soups=32,
                          threads=1)
    with ServerThread(server) as url:
        yield SimpleNamespace(url=url, server=server, backend=server.backend, run=serve_run)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty $RLPHF_HOME and a fresh working directory (runs/ lands there)."""
    monkeypatch.setenv("RLPHF_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "home"
