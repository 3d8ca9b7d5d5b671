"""The transformers backend: one base model, every policy and cached soup as a PEFT adapter, and
one decode thread that batches every running request, whatever its soup.

Continuous batching: between two decoding steps the thread admits waiting requests (up to
--max-batch rows: one row per choice), prefills them together and joins their KV cache to the
running batch (left padding); a finished or cancelled row leaves at once. One forward per step
serves every row with its own adapter through PEFT's mixed-adapter batches (`adapter_names`,
"__base__" for the base model), so concurrent users of different soups share the work.

A new soup is merged from the policies' tensors, loaded once at start-up, by the code `rlphf merge`
uses (rlphf_cli.merging.merge_in_memory) and added as an adapter; an LRU keeps --max-soups of them.
Adapters stay unmerged (LoRA layers), which is what lets rows of different soups share a batch.

Each row samples with its own torch.Generator (seeded from the request's `seed`), so a seeded
answer does not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import secrets
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rlphf_cli.errors import InputError
from rlphf_cli.serving.backend import Backend, BackendError, Delta, Finish, Job, TextStream
from rlphf_cli.serving.policies import PolicySet, Soup
from rlphf_cli.specs import ModelSpec

log = logging.getLogger("rlphf.serve")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# Adapters made ahead while idle (within --max-soups): a new soup then costs only its merge (~2 ms on
# the tiny model) instead of peft's add_adapter, which walks the whole model (~50-100 ms).
SPARE_ADAPTERS = 2


@dataclass(eq=False)
class _Row:
    """One choice of one request while it decodes."""

    job: Job
    index: int
    send: object  # callable(event), thread-safe
    generator: object = None  # torch.Generator for sampling
    adapter: str = BASE_ADAPTER
    tokens: list[int] = field(default_factory=list)
    text: TextStream = None  # type: ignore[assignment]
    cancelled: bool = False
    done: bool = False

    @property
    def position(self) -> int:
        """Position id of the last token (the one fed at the next step)."""
        return len(self.job.prompt_ids) + len(self.tokens) - 1


@dataclass(eq=False)
class _Ticket:
    """A request waiting to be admitted: its rows join the batch together."""

    rows: list[_Row]
    soup: Soup


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model: ModelSpec, policies: PolicySet, *, max_batch: int = 16, max_soups: int = 32,
                 threads: int | None = None):
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file

        from rlphf_cli.generation import check_adapter_fits, load_base_model

        model, tokenizer, model_name = load_base_model(model)
        for policy in policies.policies.values():
            check_adapter_fits(policy.path, model, model_name)
        self.policy_adapters = {name: f"policy_{i}" for i, name in enumerate(policies.policies)}
        first, *rest = policies.policies.values()
        peft_model = PeftModel.from_pretrained(model, str(first.path), adapter_name=self.policy_adapters[first.name])
        for policy in rest:
            peft_model.load_adapter(str(policy.path), adapter_name=self.policy_adapters[policy.name])
        peft_model.eval()
        context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        super().__init__(policies, tokenizer, int(context), model_name)
        self.model = peft_model
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_soups = max_soups
        # torch threads of the decode thread (OpenMP's setting is per thread; None: torch's default).
        # On a shared CPU one thread decoded the tiny model 25-50x faster than two (8 vs 200-400 ms
        # per step at load 5 on 2 cores): small matrices gain nothing from intra-op threads, which
        # stall each other when the cores are busy.
        self.threads = threads
        # The policies' tensors as saved, for merging (PEFT may have cast its own copies).
        self.tensors = {name: load_file(str(policies.inputs[name].weights_file)) for name in policies.policies}
        self.soups: OrderedDict[str, _Slot] = OrderedDict()  # soup key -> its adapter, least recently used first
        self._free: list[_Slot] = []  # adapters of evicted soups, reused by the next soup of their shapes
        self._adapter_ids = itertools.count()
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = sorted({*eos, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._torch = torch
        # transformers 5.x renamed past_key_values to cache (the old name warns until it is removed)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._cond = threading.Condition()
        self._pending: deque[_Ticket] = deque()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.merge_seconds: list[float] = []  # time to merge + add each new soup
        self.peak_batch = 0  # the most rows decoded together so far
        self._check_cache_layout()
        self._spare_signature = self._predictable_signature()

    def _predictable_signature(self) -> tuple[tuple, dict] | None:
        """The shapes and scaling every soup of these policies has, when the method fixes them (all
        but 'exact', whose rank grows with the number of members): spare adapters of that signature
        are made while the server is idle, so a new soup costs its merge, not peft's add_adapter."""
        from rlphf_cli.merging import merge_in_memory

        policies = self.policies
        if policies.method == "exact":
            return None
        name = next(iter(policies.policies))
        state, config = merge_in_memory([policies.inputs[name]], [self.tensors[name]], [1.0], policies.merge)
        return _signature(state, config), config

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="rlphf-decode", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def status(self) -> dict:
        with self._cond:
            waiting = sum(len(t.rows) for t in self._pending)
        return {**super().status(), "active": len(self._rows), "waiting": waiting, "soups_cached": len(self.soups),
                "peak_batch": self.peak_batch, "max_batch": self.max_batch, "max_soups": self.max_soups}

    def _check_cache_layout(self) -> None:
        """Joining and dropping rows edits the KV cache by hand: only plain per-layer key/value
        tensors (full attention) are supported. Checked once with a one-token forward."""
        from transformers.cache_utils import DynamicLayer

        cache = self._forward([[self.pad_id]], [[1]], [[0]], [BASE_ADAPTER], None)[1]
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise InputError(f"model {self.model_name}: its KV cache ({', '.join(kinds)}) cannot be batched by the "
                             "transformers backend (full-attention models only); use --backend vllm")

    # -- the event-loop side ------------------------------------------------------------------

    async def stream(self, job: Job) -> AsyncIterator[Delta | Finish]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def send(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        rows = [_Row(job, i, send, generator=self._generator(job, i), text=TextStream(job.sampling.stop))
                for i in range(job.sampling.n)]
        with self._cond:
            self._pending.append(_Ticket(rows, job.soup))
            self._cond.notify()
        remaining = len(rows)
        try:
            while remaining:
                event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, Finish):
                    remaining -= 1
                yield event
        finally:
            if any(not row.done for row in rows):  # the client went away: free the slots
                for row in rows:
                    row.cancelled = True
                with self._cond:
                    self._cond.notify()

    def _generator(self, job: Job, index: int):
        seed = job.sampling.seed
        value = zlib.crc32(f"{seed}:{index}".encode()) if seed is not None else secrets.randbits(63)
        return self._torch.Generator().manual_seed(value)

    # -- the decode thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        torch = self._torch
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stopping and not self._rows and not self._pending:
                    if self._wants_spare():
                        break
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = self._take_pending()
            try:
                if not admitted and not self._rows:  # idle: prepare an adapter for the next new soup
                    self._add_spare()
                    continue
                if admitted:
                    self._admit(admitted)
                self._drop(lambda row: row.done or row.cancelled)
                if self._rows:
                    with torch.inference_mode():
                        self._step()
                    self._drop(lambda row: row.done or row.cancelled)
            except Exception as exc:  # a bug or out of memory: fail the running requests, keep serving
                log.exception("decoding failed")
                failed = BackendError(f"decoding failed: {type(exc).__name__}: {exc}")
                for row in self._rows + [r for t in admitted for r in t.rows]:
                    if not row.done:
                        row.done = True
                        row.send(failed)
                self._rows, self._cache, self._mask = [], None, None

    def _take_pending(self) -> list[_Ticket]:
        taken, free = [], self.max_batch - len(self._rows)
        while self._pending:
            ticket = self._pending[0]
            if all(row.cancelled for row in ticket.rows):
                self._pending.popleft()
                self.counters.cancelled += len(ticket.rows)
                continue
            if len(ticket.rows) > free:
                break
            self._pending.popleft()
            taken.append(ticket)
            free -= len(ticket.rows)
        return taken

    def _admit(self, tickets: list[_Ticket]) -> None:
        torch = self._torch
        rows = []
        in_use = {row.adapter for row in self._rows}
        for ticket in tickets:
            try:
                adapter = self._adapter_for(ticket.soup, in_use)
                in_use.add(adapter)
            except Exception as exc:
                log.exception("soup %s failed", ticket.soup.key)
                for row in ticket.rows:
                    row.done = True
                    row.send(BackendError(f"cannot prepare soup {ticket.soup.key}: {exc}"))
                continue
            for row in ticket.rows:
                row.adapter = adapter
                rows.append(row)
        if not rows:
            return
        width = max(len(r.job.prompt_ids) for r in rows)
        ids = [[self.pad_id] * (width - len(r.job.prompt_ids)) + r.job.prompt_ids for r in rows]
        mask = [[0] * (width - len(r.job.prompt_ids)) + [1] * len(r.job.prompt_ids) for r in rows]
        positions = [[max(0, i - (width - len(r.job.prompt_ids))) for i in range(width)] for r in rows]
        with torch.inference_mode():
            logits, cache = self._forward(ids, mask, positions, [r.adapter for r in rows], None)
            self._sample_and_emit(rows, logits)
            self._join(rows, cache, torch.tensor(mask, device=self.device))

    def _forward(self, ids, mask, positions, adapters, cache):
        """One forward of the batch: (last-position logits in float32, cache)."""
        from transformers import DynamicCache

        torch = self._torch
        cache = cache if cache is not None else DynamicCache()
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, device=self.device),
                             attention_mask=torch.as_tensor(mask, device=self.device),
                             position_ids=torch.as_tensor(positions, device=self.device), use_cache=True,
                             adapter_names=list(adapters), logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :].float(), cache  # the cache grew in place

    def _step(self) -> None:
        torch = self._torch
        rows = self._rows
        ids = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits, self._cache = self._forward(ids, self._mask, positions, [row.adapter for row in rows], self._cache)
        self._sample_and_emit(rows, logits)

    def _sample_and_emit(self, rows: list[_Row], logits) -> None:
        torch = self._torch
        for i, row in enumerate(rows):
            if len(row.tokens) < row.job.sampling.min_tokens:
                logits[i, self.stop_ids] = float("-inf")
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            sampling = row.job.sampling
            token = greedy[i]
            if sampling.temperature > 0:
                probs = torch.softmax(logits[i] / sampling.temperature, dim=-1)
                if sampling.top_p < 1:
                    sorted_probs, order = probs.sort(descending=True)
                    outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # keeps at least one
                    probs = probs.scatter(0, order[outside], 0.0)
                token = int(torch.multinomial(probs.cpu(), 1, generator=row.generator))
            row.tokens.append(token)
            self._emit(row)

    def _emit(self, row: _Row) -> None:
        if row.cancelled:
            return
        sampling = row.job.sampling
        stopped = row.tokens[-1] in self.stop_ids
        content = row.tokens[:-1] if stopped else row.tokens
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        delta = row.text.update(text)
        length = (len(row.tokens) >= sampling.max_tokens
                  or len(row.job.prompt_ids) + len(row.tokens) >= self.context_length)
        if stopped or row.text.stopped or length:
            last, final = row.text.finish(text)
            if delta + last:
                row.send(Delta(row.index, delta + last))
            row.done = True
            self.counters.completion_tokens += len(row.tokens)
            row.send(Finish(row.index, final, "stop" if stopped or row.text.stopped else "length", len(row.tokens)))
        elif delta:
            row.send(Delta(row.index, delta))

    # -- the KV cache of the running batch ------------------------------------------------------

    def _join(self, rows: list[_Row], cache, mask) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side's cache."""
        torch = self._torch
        self.peak_batch = max(self.peak_batch, len(self._rows) + len(rows))
        if not self._rows:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(t, dim):
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([pad(old.keys, -2), pad(new.keys, -2)], dim=0)
            old.values = torch.cat([pad(old.values, -2), pad(new.values, -2)], dim=0)
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)], dim=0)
        self._rows += rows

    def _drop(self, leaving) -> None:
        """Remove rows from the batch (and their cache), then columns that are padding in every row."""
        keep = [i for i, row in enumerate(self._rows) if not leaving(row)]
        for row in self._rows:
            if row.cancelled and not row.done:
                row.done = True
                self.counters.cancelled += 1
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        torch = self._torch
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]
        start = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    # -- adapters -------------------------------------------------------------------------------

    def _adapter_for(self, soup: Soup, in_use: set[str]) -> str:
        """The adapter name of the soup, merging it when not cached; `in_use`: adapters that rows
        in (or entering) the batch decode with, which must not be taken for another soup."""
        if not soup.members:
            return BASE_ADAPTER
        if not soup.merged:
            return self.policy_adapters[soup.names[0]]
        if soup.key in self.soups:
            self.soups.move_to_end(soup.key)
            return self.soups[soup.key].name
        return self._add_soup(soup, in_use)

    def _add_soup(self, soup: Soup, in_use: set[str]) -> str:
        """Merge the soup and put it in an adapter slot: a free slot of the same shapes when there
        is one (its tensors are overwritten: ~1 ms), else a new PEFT adapter (peft's add_adapter
        walks the whole model: ~20-100 ms on the tiny model)."""
        from rlphf_cli.merging import merge_in_memory

        start = time.perf_counter()
        policies = self.policies
        state, config = merge_in_memory([policies.inputs[n] for n in soup.names], [self.tensors[n] for n in soup.names],
                                        soup.weights, policies.merge)
        signature = _signature(state, config)
        self._evict(in_use, room=1)
        slot = next((s for s in self._free if s.signature == signature), None)
        if slot is not None:
            self._free.remove(slot)
        else:
            slot = self._new_slot(signature, config)
        slot.fill(self.model, state)
        self.soups[soup.key] = slot
        self._trim()
        self.merge_seconds.append(time.perf_counter() - start)
        return slot.name

    def _new_slot(self, signature: tuple, config: dict) -> _Slot:
        from peft import PeftConfig

        self._trim(room=1)  # no free adapter fits: make room for a new one
        name = f"soup_{next(self._adapter_ids)}"
        peft_config = PeftConfig.from_peft_type(**config)
        peft_config.inference_mode = True
        self.model.add_adapter(name, peft_config)
        marker = f".{name}"
        params = {key.replace(marker, "", 1): param for key, param in self.model.named_parameters()
                  if f"{marker}." in key}
        return _Slot(name, signature, params)

    def _wants_spare(self) -> bool:
        if self._spare_signature is None:
            return False
        spares = sum(1 for slot in self._free if slot.signature == self._spare_signature[0])
        return spares < SPARE_ADAPTERS and len(self.soups) + len(self._free) < self.max_soups

    def _add_spare(self) -> None:
        signature, config = self._spare_signature
        try:
            self._free.append(self._new_slot(signature, config))
        except Exception:  # spares are an optimization: without them soups still work, slower
            log.exception("cannot prepare a spare adapter; new soups will each add one")
            self._spare_signature = None

    def _evict(self, in_use: set[str], room: int = 0) -> None:
        """Free least recently used soups until `room` more fit in --max-soups (never one in use:
        the cache then holds more for a while). Their adapters wait for the next soup of the same
        shapes."""
        for key in list(self.soups):
            if len(self.soups) + room <= self.max_soups:
                break
            if self.soups[key].name not in in_use:
                self._free.append(self.soups.pop(key))

    def _trim(self, room: int = 0) -> None:
        """Delete free adapters, oldest first, so that at most --max-soups adapters exist."""
        while self._free and len(self.soups) + len(self._free) + room > self.max_soups:
            self.model.delete_adapter(self._free.pop(0).name)

    def adapter_bytes(self) -> dict[str, int]:
        """Bytes of parameters held by each cached soup's adapter (for the benchmark)."""
        return {slot.name: sum(p.numel() * p.element_size() for p in slot.params.values())
                for slot in self.soups.values()}


def _signature(state: dict, config: dict) -> tuple:
    """What must match for a slot to take a soup: tensor shapes and the scaling settings."""
    scaling = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")}
    return (json.dumps(scaling, sort_keys=True),) + tuple(sorted((k, tuple(t.shape)) for k, t in state.items()))


@dataclass(eq=False)
class _Slot:
    """A PEFT adapter that holds one cached soup at a time."""

    name: str
    signature: tuple
    params: dict  # saved tensor key -> the adapter's parameter

    def fill(self, model, state: dict) -> None:
        import torch

        if set(state) != set(self.params):  # e.g. modules_to_save: let peft place them
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(model, state, adapter_name=self.name)
            return
        with torch.no_grad():
            for key, tensor in state.items():
                self.params[key].copy_(tensor)
