"""The vLLM backend (GPU): vLLM's async engine with LoRA enabled; every soup is a LoRARequest.

A soup is written once, by `rlphf merge`'s own code (merge_adapters), to a cache folder named by
the content hash of its inputs (policy files, the weights the method uses, method, parameters)
and of the merge code itself, and handed to vLLM as a LoRARequest with an integer id; vLLM keeps
the adapters on the GPU (--max-batch of them, max_loras) and on the CPU (--max-soups,
max_cpu_loras) and batches many users' soups natively. The folders are an LRU within
--soup-cache-bytes (cleaned at start; a folder in use is never deleted), and every map of this
backend is bounded by that cache or by the requests in flight, never by the number of distinct
soups asked for. Prompt ids come from rlphf_cli.prompting like everywhere else (vLLM gets token
ids, not text); sampling follows the recipe's generate settings where vLLM has them.

vLLM is imported when this backend is built (never at module import), so a machine without it
still imports rlphf. Its run on a GPU is part of the GPU check script, not of the CPU test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import os
import shutil
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

from rlphf_cli.errors import InputError
from rlphf_cli.runs import fingerprint
from rlphf_cli.serving.backend import Backend, Delta, Finish, Job, TextStream
from rlphf_cli.serving.policies import PolicySet, Soup
from rlphf_cli.specs import ModelSpec, Sampling

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


@functools.cache
def merge_code_version() -> str:
    """A hash of the merging code: a soup folder written by other merge code is never reused."""
    digest = hashlib.sha256()
    package = resources.files("rlphf_cli.merging")
    for name in sorted(p.name for p in package.iterdir() if p.name.endswith(".py")):
        digest.update(name.encode() + b"\0" + package.joinpath(name).read_bytes())
    return digest.hexdigest()[:16]


class SoupFolders:
    """Merged soup folders under `root`: least recently used deleted beyond `budget` bytes, never
    one in use. Cleaned when made: leftovers of killed writes and unfinished folders go."""

    def __init__(self, root: Path, budget: int):
        self.root, self.budget = root, budget
        self.in_use: Counter[Path] = Counter()  # folder -> requests using it (entries removed at 0)
        self.clean()

    def clean(self) -> None:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(".") and ".tmp-" in entry.name and not _writer_alive(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not entry.name.startswith(".") and not (entry / "soup.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)
        self.trim()

    def use(self, folder: Path) -> None:
        self.in_use[folder] += 1
        with contextlib.suppress(FileNotFoundError):
            os.utime(folder)  # the LRU's clock: last use

    def release(self, folder: Path) -> None:
        self.in_use[folder] -= 1
        if self.in_use[folder] <= 0:
            del self.in_use[folder]

    def trim(self) -> list[Path]:
        """Delete least recently used folders until the rest fit the budget; returns those deleted."""
        folders = [(f.stat().st_mtime, f, _size(f)) for f in self.root.iterdir()
                   if f.is_dir() and not f.name.startswith(".") and (f / "soup.json").is_file()]
        total = sum(size for _, _, size in folders)
        deleted = []
        for _, folder, size in sorted(folders, key=lambda item: item[0]):
            if total <= self.budget:
                break
            if folder not in self.in_use:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                deleted.append(folder)
        return deleted


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _writer_alive(name: str) -> bool:
    pid = name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: ModelSpec, policies: PolicySet, *, max_batch: int = 16, max_soups: int = 32,
                 sampling: Sampling = Sampling(), cache_dir: str | Path | None = None, cache_bytes: int = 4 * 2**30):
        from transformers import AutoConfig, AutoTokenizer

        from rlphf_cli.merging.io import hash_inputs

        if sampling.no_repeat_ngram_size:
            raise InputError("generate.no_repeat_ngram_size: vLLM has no such setting, so --backend vllm would sample "
                             "from another distribution than the recipe's; set it to 0 or use --backend transformers")
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
        self.recipe_sampling = sampling
        self.folders = SoupFolders(Path(cache_dir) if cache_dir else soups_cache_dir(), cache_bytes)
        hash_inputs(list(policies.inputs.values()))  # content hashes name the cached soup folders
        self.engine_args = dict(
            model=model_name, tokenizer=model_name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            dtype=cfg.dtype, seed=sampling.seed, enable_lora=True, max_lora_rank=max_lora_rank(policies),
            max_loras=max_batch, max_cpu_loras=max(max_soups, max_batch) + len(policies.policies),
            max_num_seqs=max_batch, max_model_len=int(context),
        )
        if cfg.load_in_4bit:
            self.engine_args["quantization"] = "bitsandbytes"
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**self.engine_args))
        # soup key -> LoRA int id, for the soups whose folders exist (an LRU of --max-soups entries). A
        # soup dropped from it gets a fresh id when it comes back: ids are never reused for other weights.
        self._ids: OrderedDict[str, int] = OrderedDict()
        self._next_id = itertools.count(1)  # vLLM needs ids > 0
        self.max_soups = max_soups
        self._writing: dict[str, asyncio.Future] = {}  # soup key -> its folder being written (in flight only)
        self.written: list[Path] = []  # soup folders this server merged (the latest --max-soups)

    def stop(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def status(self) -> dict:
        return {**super().status(), "loras": len(self._ids), "soup_folders_in_use": len(self.folders.in_use)}

    # -- soups as LoRA requests -----------------------------------------------------------------

    def _lora_id(self, key: str) -> int:
        if key not in self._ids:
            self._ids[key] = next(self._next_id)
            while len(self._ids) > self.max_soups + len(self.policies.policies):
                self._ids.popitem(last=False)
        self._ids.move_to_end(key)
        return self._ids[key]

    def soup_folder(self, soup: Soup) -> Path:
        """The cache folder of a merged soup, named by the content hash of everything that shapes it."""
        inputs = self.policies.inputs
        digest = fingerprint({"inputs": [inputs[n].sha256 for n in soup.names], "weights": soup.weights,
                              "method": self.policies.method, "params": self.policies.params,
                              "merge_code": merge_code_version()})
        return self.folders.root / f"{self.policies.method}-{digest[:16]}"

    async def lora_request(self, soup: Soup):
        """None for the base model; a policy's own folder; a merged soup's cache folder (written once,
        and marked in use: the caller releases it with `self.folders.release(path)`)."""
        if not soup.members:
            return None
        if not soup.merged:
            name = soup.names[0]
            return self._lora_class(name, self._lora_id(name), str(self.policies.policies[name].path))
        folder = self.soup_folder(soup)
        self.folders.use(folder)  # before looking: a trim on another thread now keeps it
        try:
            if (folder / "soup.json").is_file():
                self.metrics.soup_hits.inc()
            else:
                writing = self._writing.get(soup.key)
                if writing is None:  # the first request merges; the others for the same soup wait for it
                    self.metrics.soup_misses.inc()
                    writing = asyncio.ensure_future(asyncio.to_thread(self._write_soup, soup, folder))
                    self._writing[soup.key] = writing
                    writing.add_done_callback(lambda _, key=soup.key: self._writing.pop(key, None))
                await asyncio.shield(writing)
        except BaseException:
            self.folders.release(folder)
            raise
        return self._lora_class(soup.key, self._lora_id(soup.key), str(folder))

    def _write_soup(self, soup: Soup, folder: Path) -> None:
        import time

        from rlphf_cli.merging import merge_adapters

        policies = self.policies
        start = time.perf_counter()
        merge_adapters([policies.policies[n].path for n in soup.names], soup.weights, policies.merge, folder,
                       card_extra={"served_as": soup.key})
        self.metrics.merge_seconds.observe(time.perf_counter() - start)
        self.written = [*self.written[-self.max_soups + 1:], folder]
        self.folders.trim()

    def sampling_params(self, job: Job):
        s = job.sampling
        return self._vllm.SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                         repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens,
                                         min_tokens=s.min_tokens, stop=list(s.stop) or None, seed=s.seed,
                                         skip_special_tokens=True)

    # -- decoding -------------------------------------------------------------------------------

    async def stream(self, job: Job) -> AsyncIterator[Delta | Finish]:
        lora = await self.lora_request(job.soup)
        folder = Path(lora.lora_path) if lora is not None and job.soup.merged else None
        texts = [TextStream(job.sampling.stop) for _ in range(job.sampling.n)]
        finished: set[int] = set()
        try:
            outputs = self.engine.generate({"prompt_token_ids": list(job.prompt_ids)}, self.sampling_params(job),
                                           job.id, lora_request=lora)
            async for output in outputs:
                job.left_queue()  # vLLM scheduled it
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
            if folder is not None:
                self.folders.release(folder)
            if len(finished) < job.sampling.n:  # the client went away: vLLM frees the sequences
                self.count_cancelled(job.sampling.n - len(finished))
                await self.engine.abort(job.id)
