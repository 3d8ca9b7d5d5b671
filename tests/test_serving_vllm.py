"""`rlphf serve --backend vllm` up to the LoRARequest, with a fake `vllm` module in sys.modules (vLLM
needs a GPU; the run on a GPU is part of the GPU check script)."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.jobs import serve_spec


class FakeEngine:
    """vLLM's AsyncLLMEngine as far as rlphf uses it: generate() streams cumulative RequestOutputs."""

    def __init__(self, args):
        self.args = args
        self.calls: list[dict] = []
        self.aborted: list[str] = []

    @classmethod
    def from_engine_args(cls, args):
        return cls(args)

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.calls.append({"prompt": prompt, "params": params, "request_id": request_id, "lora": lora_request})
        name = lora_request.lora_name if lora_request else "base"
        words = f"  Hello from {name}, {len(prompt['prompt_token_ids'])} prompt tokens, and more words to come".split(" ")
        steps = min(len(words), params.max_tokens)
        for step in range(1, steps + 1):
            await asyncio.sleep(0.01)
            reason = None if step < steps else ("stop" if steps == len(words) else "length")
            yield types.SimpleNamespace(outputs=[
                types.SimpleNamespace(index=i, text=" ".join(words[:step]) + f" #{i}" * (reason is not None),
                                      token_ids=list(range(step)), finish_reason=reason)
                for i in range(params.n)])

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def shutdown(self):
        pass


def fake_vllm() -> dict[str, types.ModuleType]:
    vllm = types.ModuleType("vllm")
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")

    class Params:
        def __init__(self, **kw):
            self.__dict__.update(kw)
            self.kw = kw

    class LoRARequest:
        def __init__(self, lora_name: str, lora_int_id: int, lora_path: str):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    vllm.AsyncEngineArgs = Params
    vllm.SamplingParams = Params
    vllm.AsyncLLMEngine = FakeEngine
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request = lora, request
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}


@pytest.fixture
def vllm_modules(monkeypatch, tmp_path):
    from rlphf_cli.serving import vllm_backend

    for name, module in fake_vllm().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_backend, "soups_cache_dir", lambda: tmp_path / "soups")
    return tmp_path / "soups"


def test_each_soup_is_written_once_and_becomes_a_lora_request(vllm_modules, serve_recipe, serve_run, tmp_path):
    from rlphf_cli.serving.server import build_server

    server = build_server(serve_spec(serve_recipe), backend="vllm", max_batch=8, max_soups=20)
    backend, policies = server.backend, server.policies
    args = backend.engine.args.kw
    assert args["enable_lora"] is True and args["max_lora_rank"] == 8  # rank-4 policies, vLLM's smallest size
    assert args["max_loras"] == 8 and args["max_num_seqs"] == 8 and args["max_cpu_loras"] >= 20
    assert args["model"] == backend.model_name and args["max_model_len"] == 256

    async def requests():
        base = await backend.lora_request(policies.resolve("base"))
        policy = await backend.lora_request(policies.resolve("concise"))
        # Two first requests for one new soup at once: merged and written once.
        first, second = await asyncio.gather(backend.lora_request(policies.resolve("concise=0.7,friendly=0.3")),
                                             backend.lora_request(policies.resolve("friendly=0.3,concise=0.7")))
        other = await backend.lora_request(policies.resolve("P1A+P2A+P3A"))
        again = await backend.lora_request(policies.resolve("concise=0.7,friendly=0.3"))
        return base, policy, first, second, other, again

    base, policy, first, second, other, again = asyncio.run(requests())
    assert base is None
    assert (policy.lora_name, Path(policy.lora_path)) == ("P2A", serve_run / "policy" / "P2A")
    assert first.lora_int_id == second.lora_int_id == again.lora_int_id and first.lora_path == again.lora_path
    assert len({policy.lora_int_id, first.lora_int_id, other.lora_int_id}) == 3 and min(
        policy.lora_int_id, first.lora_int_id, other.lora_int_id) > 0
    assert len(backend.written) == 2 and Path(first.lora_path).parent == vllm_modules
    # The folder is what `rlphf merge` writes for the same soup, tensor for tensor.
    result = CliRunner().invoke(app, ["merge", "--run-dir", str(serve_run), "--prefs", "concise,friendly",
                                      "--weights", "0.7,0.3", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    cached, merged = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (first.lora_path, tmp_path / "merged"))
    assert set(cached) == set(merged) and all(torch.equal(cached[k], merged[k]) for k in merged)
    assert json.loads((Path(first.lora_path) / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "merged" / "adapter_config.json").read_text())
    # A restarted server finds the soup in the cache (named by content hash) and writes nothing.
    restarted = build_server(serve_spec(serve_recipe), backend="vllm").backend
    found = asyncio.run(restarted.lora_request(restarted.policies.resolve("concise=0.7,friendly=0.3")))
    assert found.lora_path == first.lora_path and restarted.written == []


def test_requests_reach_vllm_with_the_prompt_ids_sampling_and_lora(vllm_modules, serve_recipe):
    from rlphf_cli.prompting import instruction_with_preferences, render_prompt, text_ids
    from rlphf_cli.serving.server import ServerThread, build_server

    server = build_server(serve_spec(serve_recipe), backend="vllm")
    engine = server.backend.engine
    with ServerThread(server) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        messages = [{"role": "user", "content": "What is a volcano?"}]
        reply = client.chat.completions.create(model="concise=0.7,friendly=0.3", messages=messages, temperature=0,
                                               seed=3, n=2, stop=["zzz"], max_tokens=40)
        call = engine.calls[-1]
        prefs = server.policies.preferences.resolve("P2A,P3A")
        tokenizer = server.backend.tokenizer
        expected = text_ids(tokenizer, render_prompt(tokenizer, instruction_with_preferences(messages[0]["content"], prefs)))
        assert call["prompt"] == {"prompt_token_ids": expected}
        assert call["params"].kw == {"n": 2, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                                     "max_tokens": 40, "min_tokens": 0,
                                     "stop": ["zzz"], "seed": 3, "skip_special_tokens": True}
        assert call["lora"].lora_name == "P2A=0.7,P3A=0.3"
        texts = [c.message.content for c in reply.choices]
        assert texts == [f"Hello from P2A=0.7,P3A=0.3, {len(expected)} prompt tokens, and more words to come #{i}"
                         for i in range(2)]
        assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
        chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=5, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = client.chat.completions.create(model="base", messages=messages, max_tokens=5).choices[0].message.content
        assert streamed == whole == "Hello from base, #0"  # cut at max_tokens=5 'tokens' (words)
        assert engine.calls[-1]["lora"] is None
        # A client that goes away mid-stream: the request is aborted in vLLM.
        stream = client.chat.completions.create(model="concise", messages=messages, stream=True, max_tokens=40)
        next(iter(stream))
        stream.close()
        for _ in range(200):
            if engine.aborted:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.aborted == [engine.calls[-1]["request_id"]]


def test_exact_soups_need_a_larger_lora_rank(vllm_modules, serve_run):
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.serving.server import build_server

    recipe = load_recipe(None, ["merge.method=exact"], {"run_dir": str(serve_run)})
    backend = build_server(serve_spec(recipe), backend="vllm").backend
    assert backend.engine.args.kw["max_lora_rank"] == 16  # four rank-4 policies concatenated


def test_soup_folders_are_an_lru_within_a_byte_budget(tmp_path):
    import os

    from rlphf_cli.serving.vllm_backend import SoupFolders

    root = tmp_path / "soups"
    for i, name in enumerate(("old", "mid", "new")):
        (root / name).mkdir(parents=True)
        (root / name / "soup.json").write_text("{}")
        (root / name / "adapter_model.safetensors").write_bytes(b"0" * 998)
        os.utime(root / name, (1000 + i, 1000 + i))
    (root / "unfinished").mkdir()  # no soup.json: a folder nothing can use
    (root / ".new.tmp-999999999-1").mkdir()  # left by a writer that was killed
    folders = SoupFolders(root, budget=10**6)
    assert sorted(p.name for p in root.iterdir()) == ["mid", "new", "old"]  # cleaned at start
    folders.budget = 2100  # two folders of 1,000 bytes
    folders.use(root / "old")  # in use, and now the most recently used
    assert folders.trim() == [root / "mid"]
    folders.release(root / "old")
    assert not folders.in_use  # no entry left behind
    folders.budget = 1000
    assert folders.trim() == [root / "new"]


def test_folder_names_and_lora_ids_stay_bounded(vllm_modules, serve_recipe, monkeypatch):
    from rlphf_cli.serving import vllm_backend
    from rlphf_cli.serving.server import build_server

    backend = build_server(serve_spec(serve_recipe), backend="vllm", max_soups=2).backend
    policies = backend.policies
    soup = policies.resolve("concise=0.7,friendly=0.3")
    assert backend.soup_folder(policies.resolve("concise=7,friendly=3")) == backend.soup_folder(soup)
    with monkeypatch.context() as patch:  # other merge code: another folder, never the old one
        patch.setattr(vllm_backend, "merge_code_version", lambda: "other merge code")
        other = backend.soup_folder(soup)
    assert other != backend.soup_folder(soup)

    async def ask_many():
        ids = []
        for k in range(12):
            request = await backend.lora_request(policies.resolve(f"concise={k + 1},friendly=1"))
            backend.folders.release(Path(request.lora_path))
            ids.append(request.lora_int_id)
        return ids

    ids = asyncio.run(ask_many())
    assert len(set(ids)) == 12  # an id never names two soups
    assert len(backend._ids) <= 2 + len(policies.policies) and not backend._writing and not backend.folders.in_use
    assert len(backend.written) <= 2
