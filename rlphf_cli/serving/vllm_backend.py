"""The vLLM backend (GPU): vLLM's async engine with LoRA enabled; every soup is a LoRARequest.

A soup is written once, by `rlphf merge`'s own code (merge_adapters), to a cache folder named by
the content hash of its inputs (policy files, weights, method, parameters), and handed to vLLM as
a LoRARequest with a stable integer id; vLLM keeps the adapters on the GPU (--max-batch of them,
max_loras) and on the CPU (--max-soups, max_cpu_loras) and batches many users' soups natively.
Prompt ids come from rlphf_cli.prompting like everywhere else (vLLM gets token ids, not text).

vLLM is imported when this backend is built (never at module import), so a machine without it
still imports rlphf. Its run on a GPU is part of the GPU check script, not of the CPU test suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from rlphf_cli.errors import InputError
from rlphf_cli.runs import fingerprint
from rlphf_cli.serving.backend import Backend, Delta, Finish, Job, TextStream
from rlphf_cli.serving.policies import PolicySet, Soup
from rlphf_cli.specs import ModelSpec

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def import_vllm():
    """The vllm module, or one clear line when it is not installed."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest  # noqa: F401 (checked here, used below)
    except ImportError as exc:
        raise InputError(f"--backend vllm: vLLM is not installed ({exc}); it needs a GPU: "
                         "pip install 'rlphf[vllm]', or use --backend transformers") from None
    return vllm


def soups_cache_dir() -> Path:
    from rlphf_cli.models import rlphf_home

    return rlphf_home() / "serve-soups"


def max_lora_rank(policies: PolicySet) -> int:
    """The largest rank a soup of these policies can have with the merge method, rounded up to a
    value vLLM accepts."""
    ranks = [m.rank for a in policies.inputs.values() for m in a.modules.values()]
    needed = {"exact": sum(max(m.rank for m in a.modules.values()) for a in policies.inputs.values()),
              "svd": policies.params.get("rank") or max(ranks)}.get(policies.method, max(ranks))
    fitting = [r for r in LORA_RANKS if r >= needed]
    if not fitting:
        raise InputError(f"--backend vllm: soups of rank {needed} exceed vLLM's largest LoRA rank {LORA_RANKS[-1]}; "
                         "use --merge-method average or svd")
    return fitting[0]


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: ModelSpec, policies: PolicySet, *, max_batch: int = 16, max_soups: int = 32,
                 seed: int = 0, cache_dir: str | Path | None = None):
        from transformers import AutoConfig, AutoTokenizer

        from rlphf_cli.merging.io import hash_inputs

        vllm = import_vllm()
        from vllm.lora.request import LoRARequest

        model_name = model.path()
        cfg = model
        tokenizer = AutoTokenizer.from_pretrained(model_name, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
        config = AutoConfig.from_pretrained(model_name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        super().__init__(policies, tokenizer, int(context), model_name)
        self._vllm, self._lora_class = vllm, LoRARequest
        self.cache_dir = Path(cache_dir) if cache_dir else soups_cache_dir()
        hash_inputs(list(policies.inputs.values()))  # content hashes name the cached soup folders
        self.engine_args = dict(
            model=model_name, tokenizer=model_name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            dtype=cfg.dtype, seed=seed, enable_lora=True, max_lora_rank=max_lora_rank(policies),
            max_loras=max_batch, max_cpu_loras=max(max_soups, max_batch) + len(policies.policies),
            max_num_seqs=max_batch, max_model_len=int(context),
        )
        if cfg.load_in_4bit:
            self.engine_args["quantization"] = "bitsandbytes"
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**self.engine_args))
        self._ids: dict[str, int] = {}  # soup key -> LoRA int id (stable for the server's life)
        self._locks: dict[str, asyncio.Lock] = {}
        self.written: list[Path] = []  # soup folders this server merged (not found in the cache)

    def stop(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def status(self) -> dict:
        return {**super().status(), "loras": len(self._ids)}

    # -- soups as LoRA requests -----------------------------------------------------------------

    def _lora_id(self, key: str) -> int:
        if key not in self._ids:
            self._ids[key] = len(self._ids) + 1  # vLLM needs ids > 0
        return self._ids[key]

    def soup_folder(self, soup: Soup) -> Path:
        """The cache folder of a merged soup, named by the content hash of everything that shapes it."""
        inputs = self.policies.inputs
        digest = fingerprint({"inputs": [inputs[n].sha256 for n in soup.names], "weights": soup.weights,
                              "method": self.policies.method, "params": self.policies.params})
        return self.cache_dir / f"{self.policies.method}-{digest[:16]}"

    async def lora_request(self, soup: Soup):
        """None for the base model; a policy's own folder; a merged soup's cache folder (written once)."""
        if not soup.members:
            return None
        if not soup.merged:
            name = soup.names[0]
            return self._lora_class(name, self._lora_id(name), str(self.policies.policies[name].path))
        folder = self.soup_folder(soup)
        lock = self._locks.setdefault(soup.key, asyncio.Lock())
        async with lock:  # two first requests for one soup merge it once
            if not (folder / "soup.json").is_file():
                await asyncio.to_thread(self._write_soup, soup, folder)
        return self._lora_class(soup.key, self._lora_id(soup.key), str(folder))

    def _write_soup(self, soup: Soup, folder: Path) -> None:
        from rlphf_cli.merging import merge_adapters

        policies = self.policies
        merge_adapters([policies.policies[n].path for n in soup.names], soup.weights, policies.merge, folder,
                       card_extra={"served_as": soup.key})
        self.written.append(folder)

    def sampling_params(self, job: Job):
        s = job.sampling
        return self._vllm.SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                         min_tokens=s.min_tokens, stop=list(s.stop) or None, seed=s.seed,
                                         skip_special_tokens=True)

    # -- decoding -------------------------------------------------------------------------------

    async def stream(self, job: Job) -> AsyncIterator[Delta | Finish]:
        lora = await self.lora_request(job.soup)
        texts = [TextStream(job.sampling.stop) for _ in range(job.sampling.n)]
        finished: set[int] = set()
        outputs = self.engine.generate({"prompt_token_ids": list(job.prompt_ids)}, self.sampling_params(job), job.id,
                                       lora_request=lora)
        try:
            async for output in outputs:
                for choice in output.outputs:
                    if choice.index in finished:
                        continue
                    text = texts[choice.index]
                    if choice.finish_reason is None:
                        delta = text.update(choice.text)
                        if delta:
                            yield Delta(choice.index, delta)
                        continue
                    last, final = text.finish(choice.text)
                    if last:
                        yield Delta(choice.index, last)
                    finished.add(choice.index)
                    tokens = len(choice.token_ids)
                    self.counters.completion_tokens += tokens
                    yield Finish(choice.index, final, "length" if choice.finish_reason == "length" else "stop", tokens)
        finally:
            if len(finished) < job.sampling.n:  # the client went away: vLLM frees the sequences
                self.counters.cancelled += job.sampling.n - len(finished)
                await self.engine.abort(job.id)

