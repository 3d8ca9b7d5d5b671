"""The transformers backend: one base model, every policy and cached soup as a PEFT adapter, and
one decode thread that batches every running request, whatever its soup.

Continuous batching: between two decoding steps the thread admits waiting requests (up to
--max-batch rows: one row per choice), prefills them together and joins their KV cache to the
running batch (left padding); a finished or cancelled row leaves at once. One forward per step
serves every row with its own adapter through PEFT's mixed-adapter batches (`adapter_names`,
"__base__" for the base model), so concurrent users of different soups share the work.

A new soup is merged by a worker thread from the policies' tensors, loaded once at start-up, by
the code `rlphf merge` uses (rlphf_cli.merging.merge_in_memory): its requests wait while running
streams keep decoding, and requests for the same new soup share one merge. The decode thread then
copies the merged tensors into a free adapter slot (made ahead while idle, up to --max-soups); an
LRU keeps --max-soups soups. Adapters stay unmerged (LoRA layers), which is what lets rows of
different soups share a batch. Soups are keyed by the weights the merge method uses, so
'concise=7,friendly=3' and 'concise=0.7,friendly=0.3' are one soup.

Failures stay with their request: when a prefill or a step fails, the KV cache is put back as it
was, each row is tried alone to find the one at fault, that row gets the error and the others go
on with their cache and their tokens. If the decode thread dies anyway, every waiting and running
request gets a 503 and so does every new one (the `dead` property says why).

Each row samples from its own seeded random stream (rlphf_cli.sampling), with the recipe's
generate settings, so a seeded answer does not depend on what else is in the batch and equals
`rlphf generate`'s.

A mixed soup (compose "logits") needs no merge: each of its choices is decoded by k rows, one per
policy with that policy's adapter and its own KV cache, beside every other row of the batch; the
first (the leader) holds the choice, the others follow it. The leader's next token is drawn from
sum_i w_i log softmax(logits of row i), and every follower is given the same token.
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
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from rlphf_cli.errors import InputError
from rlphf_cli.sampling import row_seed, sample, uniforms
from rlphf_cli.serving.backend import Backend, BackendError, BackendUnavailable, Delta, Finish, Job, TextStream
from rlphf_cli.serving.policies import PolicySet, Soup
from rlphf_cli.specs import ModelSpec

log = logging.getLogger("rlphf.serve")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# How often a waiting request checks that the decode thread is still alive (seconds).
WATCHDOG_SECONDS = 0.5


@dataclass(eq=False)
class _Row:
    """One choice of one request while it decodes."""

    job: Job
    index: int
    send: object  # callable(event), thread-safe, never raises
    uniforms: object = None  # float64 tensor, one per step (None: greedy)
    adapter: str = BASE_ADAPTER
    tokens: list[int] = field(default_factory=list)
    text: TextStream = None  # type: ignore[assignment]
    seen: dict = field(default_factory=dict)  # token ids of prompt and answer (repetition penalty), in order
    ngrams: dict = field(default_factory=dict)  # (n-1 tokens) -> tokens that followed them (no_repeat_ngram_size)
    cancelled: bool = False
    done: bool = False
    followers: list = field(default_factory=list)  # a mix's leader: the rows of its other policies
    mix: object = None  # a mix's leader: the policies' weights (float32 tensor, one per row, leader first)
    leader: _Row | None = None  # a mix's follower: the row whose token it takes

    @property
    def position(self) -> int:
        """Position id of the last token (the one fed at the next step)."""
        return len(self.job.prompt_ids) + len(self.tokens) - 1

    @property
    def sequence(self) -> list[int]:
        return self.job.prompt_ids + self.tokens

    def record(self, tokens: list[int]) -> None:
        """Note tokens of the sequence for the repetition constraints."""
        sampling = self.job.sampling
        if sampling.repetition_penalty != 1.0:
            self.seen.update(dict.fromkeys(tokens))
        n = sampling.no_repeat_ngram_size
        if n:
            sequence = self.sequence
            for end in range(len(sequence) - len(tokens), len(sequence)):
                if end >= n - 1:
                    self.ngrams.setdefault(tuple(sequence[end - n + 1:end]), set()).add(sequence[end])

    def banned(self) -> set:
        n = self.job.sampling.no_repeat_ngram_size
        if not n:
            return set()
        sequence = self.sequence
        if len(sequence) + 1 < n:
            return set()
        return self.ngrams.get(tuple(sequence[len(sequence) - n + 1:]), set())


@dataclass(eq=False)
class _Ticket:
    """A request waiting to be admitted: its rows join the batch together."""

    rows: list[_Row]
    soup: Soup
    looked_up: bool = False  # counted as a soup cache hit or miss

    @property
    def cancelled(self) -> bool:
        return all(row.cancelled for row in self.rows)


class TransformersBackend(Backend):
    name = "transformers"
    mixes_logits = True

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
        self._batch_adapters: list[str] = []  # each row's adapter in the forward being run
        _route_adapters(peft_model, self._batch_adapters)
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
        self._free: list[_Slot] = []  # adapters holding no soup, reused by the next soup of their shapes
        self._adapter_ids = itertools.count()
        self._merges: dict[str, Future] = {}  # soup key -> its merge on the worker (one per soup at a time)
        self._merged: deque[tuple[str, Future]] = deque()  # finished merges for the decode thread to place
        self._merger: ThreadPoolExecutor | None = None
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
        self._dead: str | None = None
        self._thread: threading.Thread | None = None
        self.merges = 0  # soups merged so far
        self.merge_seconds: deque[float] = deque(maxlen=256)  # the latest merges' times (merge + load)
        self.peak_batch = 0  # the most rows decoded together so far
        self._check_cache_layout()
        self._pool_signature = self._predictable_signature()

    def _predictable_signature(self) -> tuple[tuple, dict] | None:
        """The shapes and scaling every soup of these policies has, when the method fixes them (all
        but 'exact', whose rank grows with the number of members): adapter slots of that signature
        are made while the server is idle, up to --max-soups, so a new soup costs its merge (on the
        worker) and a copy, never peft's add_adapter on the decode thread."""
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
            self._stopping, self._dead = False, None
            self._merger = ThreadPoolExecutor(1, thread_name_prefix="rlphf-merge", initializer=self._one_thread)
            self._thread = threading.Thread(target=self._loop, name="rlphf-decode", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._merger is not None:
            self._merger.shutdown(wait=False, cancel_futures=True)
            self._merger = None

    def _one_thread(self) -> None:
        self._torch.set_num_threads(1)  # merging is memory-bound; leave the cores to decoding

    @property
    def dead(self) -> str | None:
        if self._dead is None and self._thread is not None and not self._thread.is_alive() and not self._stopping:
            self._dead = "the decode thread stopped"
        return self._dead

    def running_rows(self) -> int:
        return len(self._rows)

    def status(self) -> dict:
        with self._cond:
            waiting = sum(len(t.rows) for t in self._pending)
        return {**super().status(), "active": len(self._rows), "waiting": waiting, "soups_cached": len(self.soups),
                "adapter_slots": len(self.soups) + len(self._free), "merging": len(self._merges),
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
        if self.dead:
            raise BackendUnavailable(f"the server cannot decode: {self.dead}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def send(event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        rows = [self._row(job, i, send) for i in range(job.sampling.n)]
        with self._cond:
            self._pending.append(_Ticket(rows, job.soup))
            self._cond.notify()
        remaining = len(rows)
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(queue.get(), WATCHDOG_SECONDS)
                except asyncio.TimeoutError:
                    if self.dead:
                        raise BackendUnavailable(f"the server cannot decode: {self.dead}") from None
                    continue
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

    def _row(self, job: Job, index: int, send) -> _Row:
        sampling = job.sampling
        row = _Row(job, index, send, text=TextStream(sampling.stop))
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            row.uniforms = uniforms(row_seed(seed, index, job.prompt_text), sampling.max_tokens)
        row.record(job.prompt_ids)
        return row

    # -- the decode thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug outside any one request: nothing can decode any more
            log.exception("the decode thread died")
            self._die(f"{type(exc).__name__}: {exc}")

    def _serve(self) -> None:
        torch = self._torch
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    merged, admitted = list(self._merged), []
                    self._merged.clear()
                    if merged:
                        break
                    admitted = self._take_pending()
                    if admitted or self._rows or self._wants_slot():
                        break
                    self._cond.wait()
            if merged:  # placed out of the lock: the event loop never waits for a copy or add_adapter
                self._place_merged(merged)
                continue
            if not admitted and not self._rows:  # idle: prepare an adapter slot for a new soup
                self._add_spare()
                continue
            if admitted:
                self._admit(admitted)
            self._drop(lambda row: row.done or row.cancelled)
            if self._rows:
                self._decode_step()
                self._drop(lambda row: row.done or row.cancelled)

    def _die(self, reason: str) -> None:
        with self._cond:
            self._dead = reason
            rows = self._rows + [row for ticket in self._pending for row in ticket.rows]
            self._rows, self._cache, self._mask = [], None, None
            self._pending.clear()
        for row in rows:
            self._fail(row, BackendUnavailable(f"the server cannot decode: {reason}"))

    def _fail(self, row: _Row, error: Exception) -> None:
        if not row.done:
            row.done = True
            row.send(error)

    def _take_pending(self) -> list[_Ticket]:
        """(Under the lock.) The waiting requests that join the batch now, in order: those whose
        soup is ready, while rows are free. Starts the merges of new soups."""
        taken, free = [], self.max_batch - len(self._rows)
        for ticket in list(self._pending):
            if ticket.cancelled:
                self._pending.remove(ticket)
                self.count_cancelled(len(ticket.rows))
                continue
            if ticket.soup.mixed:
                if len(ticket.rows) * len(ticket.soup.members) > free:
                    break
                self._pending.remove(ticket)
                self._expand_mix(ticket)
                taken.append(ticket)
                free -= len(ticket.rows)
                continue
            adapter = self._adapter_for(ticket)
            if adapter is None:  # its soup is being merged: the requests behind it go on
                continue
            if len(ticket.rows) > free:
                break
            self._pending.remove(ticket)
            for row in ticket.rows:
                row.adapter = adapter
                row.job.left_queue()
            taken.append(ticket)
            free -= len(ticket.rows)
        return taken

    def _expand_mix(self, ticket: _Ticket) -> None:
        """(Under the lock.) A mixed soup's rows: each choice gets a follower row per further policy."""
        adapters = [self.policy_adapters[name] for name in ticket.soup.names]
        weights = self._torch.tensor(ticket.soup.weights, dtype=self._torch.float32, device=self.device)
        for leader in list(ticket.rows):
            leader.adapter, leader.mix = adapters[0], weights
            leader.job.left_queue()

            def send(event, leader=leader) -> None:  # a follower's failure is its choice's
                if isinstance(event, Exception):
                    self._fail(leader, event)

            for adapter in adapters[1:]:
                follower = _Row(leader.job, leader.index, send, adapter=adapter, leader=leader)
                leader.followers.append(follower)
                ticket.rows.append(follower)

    def _admit(self, tickets: list[_Ticket]) -> None:
        rows = [row for ticket in tickets for row in ticket.rows]
        while rows:
            try:
                self._prefill(rows)
                return
            except Exception as exc:
                rows = self._isolate(rows, exc)

    def _prefill(self, rows: list[_Row]) -> None:
        torch = self._torch
        width = max(len(r.job.prompt_ids) for r in rows)
        ids = [[self.pad_id] * (width - len(r.job.prompt_ids)) + r.job.prompt_ids for r in rows]
        mask = [[0] * (width - len(r.job.prompt_ids)) + [1] * len(r.job.prompt_ids) for r in rows]
        positions = [[max(0, i - (width - len(r.job.prompt_ids))) for i in range(width)] for r in rows]
        logits, cache = self._forward(ids, mask, positions, [r.adapter for r in rows], None)
        tokens = self._next_tokens(rows, logits)
        self._join(rows, cache, torch.tensor(mask, device=self.device))
        self._emit_all(rows, tokens)

    def _decode_step(self) -> None:
        """One step of the running batch; a failure is rolled back and isolated, then the step is
        taken again without the rows at fault."""
        while self._rows:
            saved = self._mask, [(layer.keys, layer.values) for layer in self._cache.layers]
            try:
                self._step()
                return
            except Exception as exc:
                self._mask = saved[0]
                for layer, (keys, values) in zip(self._cache.layers, saved[1], strict=True):
                    layer.keys, layer.values = keys, values
                self._isolate(list(self._rows), exc)
                self._drop(lambda row: row.done or row.cancelled)

    def _isolate(self, rows: list[_Row], error: Exception) -> list[_Row]:
        """After a failed batch: fail the rows that fail alone (each row's whole sequence forwarded
        on its own), return the others. When no row fails alone, the batch as a whole failed (say,
        out of memory): every row gets the error."""
        log.error("decoding a batch of %d rows failed: %s: %s", len(rows), type(error).__name__, error)
        culprits = [row for row in rows if self._fails_alone(row)] if len(rows) > 1 else rows
        for row in culprits or rows:
            self._fail(row, BackendError(f"decoding failed: {type(error).__name__}: {error}"))
        return [row for row in rows if not row.done]

    def _fails_alone(self, row: _Row) -> bool:
        sequence = row.sequence
        try:
            self._forward([sequence], [[1] * len(sequence)], [list(range(len(sequence)))], [row.adapter], None)
        except Exception:
            return True
        return False

    def _forward(self, ids, mask, positions, adapters, cache):
        """One forward of the batch: (last-position logits in float32, cache)."""
        from transformers import DynamicCache

        torch = self._torch
        cache = cache if cache is not None else DynamicCache()
        self._batch_adapters[:] = adapters
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, device=self.device),
                             attention_mask=torch.as_tensor(mask, device=self.device),
                             position_ids=torch.as_tensor(positions, device=self.device), use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :].float(), cache  # the cache grew in place

    def _step(self) -> None:
        torch = self._torch
        rows = self._rows
        ids = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits, self._cache = self._forward(ids, mask, positions, [row.adapter for row in rows], self._cache)
        tokens = self._next_tokens(rows, logits)
        self._mask = mask
        self._emit_all(rows, tokens)

    def _next_tokens(self, rows: list[_Row], logits) -> list[int | None]:
        """Every row's next token from its logits: the one place where per-row logits are processed.
        The recipe's constraints in `generate`'s order (repetition penalty, no-repeat n-grams,
        min_tokens), then greedy, or a seeded sample (temperature, top-k, top-p). A row whose processing
        fails gets the error (None here); the others are unaffected."""
        torch = self._torch
        greedy = logits.argmax(dim=-1).tolist()  # what a row without constraints or sampling takes
        place = {id(row): i for i, row in enumerate(rows)}
        tokens: list[int | None] = []
        for i, row in enumerate(rows):
            sampling = row.job.sampling
            if row.leader is not None:  # given its leader's token below
                tokens.append(None)
                continue
            if row.mix is None and row.uniforms is None and not row.seen and not sampling.no_repeat_ngram_size and (
                    len(row.tokens) >= sampling.min_tokens):
                tokens.append(greedy[i])
                continue
            try:
                scores = logits[i:i + 1]
                if row.mix is not None:
                    group = [i] + [place[id(f)] for f in row.followers]
                    logp = torch.log_softmax(logits[group], dim=-1)
                    scores = (logp * row.mix.unsqueeze(1)).sum(dim=0, keepdim=True)
                if row.seen:
                    seen = torch.tensor(list(row.seen), device=scores.device).unsqueeze(0)
                    picked = scores.gather(1, seen)
                    penalty = sampling.repetition_penalty
                    scores = scores.scatter(1, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
                banned = row.banned()
                if banned:
                    scores = scores.index_fill(1, torch.tensor(sorted(banned), device=scores.device), float("-inf"))
                if len(row.tokens) < sampling.min_tokens:
                    scores = scores.index_fill(1, torch.tensor(self.stop_ids, device=scores.device), float("-inf"))
                if row.uniforms is None:
                    tokens.append(int(scores.argmax(dim=-1)))
                    continue
                u = row.uniforms[len(row.tokens):len(row.tokens) + 1].to(scores.device)
                tokens.append(int(sample(scores, u, sampling.temperature, sampling.top_k, sampling.top_p)))
            except Exception as exc:
                log.exception("sampling failed for %s", row.job.id)
                self._fail(row, BackendError(f"sampling failed: {type(exc).__name__}: {exc}"))
                tokens.append(None)
        for i, row in enumerate(rows):
            if row.leader is not None and id(row.leader) in place:
                tokens[i] = tokens[place[id(row.leader)]]
        return tokens

    def _emit_all(self, rows: list[_Row], tokens: list[int | None]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            if token is None or row.done:
                continue
            if row.leader is not None:  # its leader speaks for the choice
                row.tokens.append(token)
                continue
            row.tokens.append(token)
            row.record([token])
            try:
                self._emit(row)
            except Exception as exc:  # e.g. the tokenizer cannot decode: this row only
                log.exception("emitting failed for %s", row.job.id)
                self._fail(row, BackendError(f"decoding text failed: {type(exc).__name__}: {exc}"))

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
        for row in self._rows:
            if row.leader is not None:  # a follower leaves with its leader
                row.done, row.cancelled = row.done or row.leader.done, row.cancelled or row.leader.cancelled
        keep = [i for i, row in enumerate(self._rows) if not leaving(row)]
        for row in self._rows:
            if row.leader is not None:
                continue
            if row.cancelled and not row.done:
                row.done = True
                self.count_cancelled(1)
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

    def _adapter_for(self, ticket: _Ticket) -> str | None:
        """(Under the lock.) The adapter name of the ticket's soup, or None while it is merged (the
        merge is started here when it is not running yet)."""
        soup = ticket.soup
        if not soup.members:
            return BASE_ADAPTER
        if not soup.merged:
            return self.policy_adapters[soup.names[0]]
        slot = self.soups.get(soup.key)
        if not ticket.looked_up:
            ticket.looked_up = True
            (self.metrics.soup_hits if slot is not None else self.metrics.soup_misses).inc()
        if slot is not None:
            self.soups.move_to_end(soup.key)
            return slot.name
        if soup.key not in self._merges:
            future = self._merger.submit(self._merge, soup)
            self._merges[soup.key] = future
            future.add_done_callback(lambda done, key=soup.key: self._merge_done(key, done))
        return None

    def _merge(self, soup: Soup) -> tuple[dict, dict, float]:
        """(On the merge worker.) The soup's tensors and adapter config, by `rlphf merge`'s code."""
        from rlphf_cli.merging import merge_in_memory

        start = time.perf_counter()
        names = soup.names
        state, config = merge_in_memory([self.policies.inputs[n] for n in names], [self.tensors[n] for n in names],
                                        soup.weights, self.policies.merge)
        return state, config, time.perf_counter() - start

    def _merge_done(self, key: str, future: Future) -> None:
        with self._cond:
            self._merged.append((key, future))
            self._cond.notify()

    def _place_merged(self, merged: list[tuple[str, Future]]) -> None:
        """(On the decode thread.) Copy finished merges into adapter slots: a free slot of the same
        shapes when there is one (~1 ms), else a new PEFT adapter (peft's add_adapter walks the whole
        model: ~20-100 ms on the tiny model). A failed merge fails the requests waiting for it."""
        for key, future in merged:
            try:
                state, config, seconds = future.result()
                start = time.perf_counter()
                slot = self._slot_for(_signature(state, config), config)
                slot.fill(self.model, state)
            except Exception as exc:
                log.exception("soup %s failed", key)
                with self._cond:
                    self._merges.pop(key, None)
                    waiting = [t for t in self._pending if t.soup.key == key]
                    for ticket in waiting:
                        self._pending.remove(ticket)
                for row in (row for ticket in waiting for row in ticket.rows):
                    self._fail(row, BackendError(f"cannot prepare soup {key}: {type(exc).__name__}: {exc}"))
                continue
            with self._cond:
                self._merges.pop(key, None)
                self.soups[key] = slot
            self._trim()
            self.merges += 1
            self.merge_seconds.append(seconds + time.perf_counter() - start)
            self.metrics.merge_seconds.observe(self.merge_seconds[-1])

    def _slot_for(self, signature: tuple, config: dict) -> _Slot:
        """A slot for a new soup, after making room in --max-soups: never one that a running row
        or a waiting request uses (the cache then holds more for a while)."""
        with self._cond:
            pending = list(self._pending)
        keep = {row.adapter for row in self._rows}
        keep |= {self.soups[t.soup.key].name for t in pending if t.soup.key in self.soups}
        self._evict(keep, room=1)
        slot = next((s for s in self._free if s.signature == signature), None)
        if slot is not None:
            self._free.remove(slot)
            return slot
        return self._new_slot(signature, config)

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

    def _wants_slot(self) -> bool:
        """(Under the lock.) Whether an idle moment should make one more adapter slot."""
        return self._pool_signature is not None and len(self.soups) + len(self._free) < self.max_soups

    def _add_spare(self) -> None:
        signature, config = self._pool_signature
        try:
            self._free.append(self._new_slot(signature, config))
        except Exception:  # slots made ahead are an optimization: without them soups still work, slower
            log.exception("cannot prepare an adapter slot; new soups will each add one")
            self._pool_signature = None

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


def _route_adapters(model, names: list[str]) -> None:
    """Give every LoRA layer (and modules_to_save wrapper) `names`, the adapter of each row, at each
    forward: PEFT's mixed-adapter batches. Passing `adapter_names=` to the model does the same, but
    PEFT then walks every module twice per forward to check the names and add hooks, and each
    adapter adds three modules per layer: with 32 soups cached that walk cost more than the tiny
    model's whole decoding step. The layers are fixed once the policies are loaded (soups target
    the same modules), so the hooks are added here, once."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    for module in model.modules():
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            module.register_forward_pre_hook(inject, with_kwargs=True)


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
