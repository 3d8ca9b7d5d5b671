"""Batched decoding with the base model, one LoRA adapter or a soup of adapters.

An adapter or soup is merged into the weights before decoding (peft's merge_and_unload), so a soup
decodes as fast as the base model. A soup composed "logits" (Weights.compose) is not merged: every
expert decodes each row (the rows repeated, one per expert, through PEFT's mixed-adapter batches, so
each expert keeps its own KV cache) and the next token is drawn from sum_i w_i log p_i. Prompts are sorted by length and left-padded in batches.
Sampling is seeded per prompt and sample: each row of a batch draws its tokens from its own random
stream (a seed from the sampling seed, the prompt text and the sample index), so what a prompt gets
does not depend on which prompts share its batch, on the batch size, or on a resume.
Outputs are JSONL records (see the team's shared format), appended as they are generated, so an
interrupted run resumes (`resume=True`) without duplicate ids and with the same records.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlphf_cli import files
from rlphf_cli.errors import InputError, Interrupted
from rlphf_cli.preferences import PreferenceSet, combination_name
from rlphf_cli.prompting import instruction_with_preferences, render_prompt, text_ids
from rlphf_cli.runs import JsonlAppender, atomic_write_text, file_sha256, read_jsonl
from rlphf_cli.sampling import row_seed, sample, uniforms
from rlphf_cli.specs import GenerateJob, ModelSpec, PromptedPreference, Sampling, Weights

# progress(label, prompts done, prompts total, tokens generated so far): called after each batch.
Progress = Callable[[str, int, int, int], None]

ADAPTER_CONFIG = "adapter_config.json"
MAX_RESAMPLE_ROUNDS = 3  # extra tries to make a prompt's samples distinct (annotation needs pairs)


# --------------------------------------------------------------------------------------------
# What to decode with: the base model, one adapter, or a soup


def parse_soup(spec: str | Mapping[str, float], preferences: PreferenceSet | None = None, *,
               where: str = "--soup") -> list[tuple[str, float]]:
    """The one syntax of a soup, wherever one is named (`rlphf generate --soup`, the `model` field
    of `rlphf serve`): 'concise=0.7,friendly=0.3' (weights), 'concise,friendly' or 'P1A+P2A+P3A'
    (equal weights), 'concise' (one member), or a mapping {name: weight}. -> [(name, weight)] in
    the order given.

    With `preferences`, a preference's alias becomes its id. Names are not checked against what
    exists (the caller knows its policies). Errors are InputError naming `where` and the bad part.
    Two preferences of one dimension are allowed (preferences.same_dimension_note says so).
    """
    if isinstance(spec, Mapping):
        pairs: list[tuple[str, object]] = [(str(name), weight) for name, weight in spec.items()]
        text = ",".join(f"{name}={weight}" for name, weight in pairs)
    else:
        text = spec.strip()
        plus, comma = "+" in text, "," in text
        if plus and comma:
            raise InputError(f"{where} '{spec}': use '+' (equal weights) or ',' (name=weight pairs), not both")
        parts = [p.strip() for p in text.split("+" if plus else ",")]
        if plus and not all(parts):
            raise InputError(f"{where} '{spec}': empty member in a '+' combination")
        pairs = [(name.strip(), raw.strip() if sep else None)
                 for name, sep, raw in (part.partition("=") for part in parts if part)]
        if plus and any(w is not None for _, w in pairs):
            raise InputError(f"{where} '{spec}': a '+' combination has equal weights; write name=weight pairs "
                             "separated by ',' for other weights")
    if not pairs:
        raise InputError(f"{where}: empty soup; expected e.g. concise=0.5,friendly=0.5 or P1A+P2A+P3A")
    for name, _ in pairs:
        if not name:
            raise InputError(f"{where} '{text}': a weight without a name")
    weighted = [name for name, w in pairs if w is not None]
    if weighted and len(weighted) != len(pairs):
        missing = next(name for name, w in pairs if w is None)
        raise InputError(f"{where} '{text}': '{missing}' has no weight (give every member a weight, or none)")
    members: list[tuple[str, float]] = []
    for name, raw in pairs:
        if raw is None:
            weight = 1.0 / len(pairs)
        else:
            try:
                if isinstance(raw, bool):
                    raise TypeError
                weight = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InputError(f"{where} '{text}': weight '{raw}' of '{name}' is not a number") from None
            if not math.isfinite(weight):
                raise InputError(f"{where} '{text}': weight '{raw}' of '{name}' is not a finite number")
        members.append((name, weight))
    if all(w == 0 for _, w in members):
        raise InputError(f"{where} '{text}': every weight is 0; give at least one member a non-zero weight")
    known = {n.lower() for n in preferences.names()} if preferences is not None else set()
    members = [(preferences.get(n).id if n.lower() in known else n, w) for n, w in members]
    names = [n for n, _ in members]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"{where} '{text}': '{name}' appears twice")
    return members


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise InputError(f"--weights: '{text}' is not a comma-separated list of numbers") from None


def soup_from_adapters(adapters: Sequence[str], weights: Sequence[float] | None) -> list[tuple[str, float]]:
    """--adapters A,B --weights 0.7,0.3 -> [(A, 0.7), (B, 0.3)]; no weights: uniform."""
    if not adapters:
        raise InputError("--adapters: no adapter given")
    if weights is None:
        weights = [1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(f"--weights: {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    return list(zip(adapters, weights, strict=True))


def mix_weights(weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """The members a decoding-time mix uses and their weights: weight-0 members dropped, the others
    normalized to sum 1 (a mix of log-probabilities at weights summing to 2 would sharpen it like a
    temperature of 0.5). Negative weights are refused."""
    for w in weights:
        if w < 0:
            raise InputError(f"negative weight {w:g}: compose 'logits' mixes log-probabilities with weights >= 0")
    kept = [i for i, w in enumerate(weights) if w != 0]
    if not kept:
        raise InputError("--weights: every weight is 0; give at least one member a non-zero weight")
    total = sum(weights[i] for i in kept)
    return kept, [weights[i] / total for i in kept]


def check_adapter_fits(adapter_dir: Path, model, model_name: str) -> None:
    """Raise InputError when the adapter was made for another base model (or is not a causal LM
    adapter), before peft fails with a long size-mismatch traceback."""
    config = files.read_json_object(adapter_dir / ADAPTER_CONFIG, "adapter config")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise InputError(f"{adapter_dir}: a {task} adapter (a reward model?), not a CAUSAL_LM policy")
    base = config.get("base_model_name_or_path") or "an unknown model"
    modules = dict(model.named_modules())
    for key, shape in _adapter_shapes(adapter_dir).items():
        match = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not match:
            continue
        module = modules.get(match.group(1))
        if module is None or not hasattr(module, "in_features"):
            raise InputError(f"{adapter_dir}: made for another base model ({base}): {model_name} has no "
                             f"linear module '{match.group(1)}'")
        expected = module.in_features if match.group(2) == "A" else module.out_features
        actual = shape[1] if match.group(2) == "A" else shape[0]
        if actual != expected:
            raise InputError(f"{adapter_dir}: made for another base model ({base}): '{match.group(1)}' has "
                             f"{expected} features in {model_name}, {actual} in the adapter")


def _adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    file = adapter_dir / "adapter_model.safetensors"
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        import torch

        return {k: list(v.shape) for k, v in torch.load(legacy, map_location="cpu", weights_only=True).items()}
    raise InputError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors)")


# --------------------------------------------------------------------------------------------
# The generator: a loaded model, reused across files and combinations


def weights_record(model: str, weights: Weights) -> dict:
    """For each generated record: which weights made it (adapter files by content hash)."""
    adapters = [{"path": str(m.path), "weight": m.weight if weights.merge is not None else 1.0,
                 "sha256": _adapter_sha(m.path)} for m in weights.members]
    out = {"model": model, "adapters": adapters, "merge_method": weights.merge.method if weights.merge else None}
    if weights.compose != "params":
        out["compose"] = weights.compose
    return out


def _adapter_sha(folder: Path) -> str:
    weights = folder / "adapter_model.safetensors"
    return file_sha256(weights)[:16] if weights.is_file() else ""


class Generator:
    """A model ready to decode (any adapter or soup already merged) with its tokenizer and settings."""

    def __init__(self, model, tokenizer, *, system: str, sampling: Sampling, prompt_format: str = "chat",
                 batch_size: int = 32, model_name: str = "", weights: dict | None = None,
                 mix: tuple[tuple[str, ...], tuple[float, ...]] | None = None):
        self.model = model
        self.mix = mix  # (PEFT adapter names, weights) of a decoding-time mix, else None
        self.tokenizer = tokenizer
        self.system = system
        self.sampling = sampling
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.model_name = model_name
        self.weights = weights or {"model": model_name, "adapters": [], "merge_method": None}

    @classmethod
    def load(cls, model: ModelSpec, weights: Weights = Weights(), *, sampling: Sampling = Sampling(),
             batch_size: int = 32, system: str | None = None, merge: bool = True) -> Generator:
        """Load the model; with an adapter or a soup, merge it in first (a soup is merged from the
        adapter files by rlphf merge's code). `merge=False` keeps peft's unmerged LoRA layers (for
        comparison only)."""
        loaded, tokenizer, model_name = load_base_model(model)
        for member in weights.members:
            check_adapter_fits(member.path, loaded, model_name)
        mix = None
        if weights.merge is not None and weights.compose == "logits":
            kept, used = mix_weights([m.weight for m in weights.members])
            if len(kept) == 1:  # all weight on one expert: that expert's own tokens
                loaded = _apply_adapter(loaded, weights.members[kept[0]].path, merge)
            else:
                loaded, names = _load_experts(loaded, [weights.members[i].path for i in kept])
                mix = (tuple(names), tuple(used))
        elif weights.merge is not None:
            with tempfile.TemporaryDirectory(prefix="rlphf-soup-") as tmp:
                loaded = _apply_adapter(loaded, _merge_soup(weights, Path(tmp) / "soup"), merge)
        elif weights.adapter is not None:
            loaded = _apply_adapter(loaded, weights.adapter.path, merge)
        loaded.eval()
        return cls(loaded, tokenizer, system=system or weights.system(), sampling=sampling,
                   prompt_format=model.prompt_format, batch_size=batch_size, model_name=model_name,
                   weights=weights_record(model.name, weights), mix=mix)

    @classmethod
    def for_job(cls, job: GenerateJob) -> Generator:
        return cls.load(job.model, job.weights, sampling=job.sampling, batch_size=job.batch_size, system=job.system)

    # -- decoding -------------------------------------------------------------------------------

    def prompt_text(self, instruction: str, prefs: Sequence[PromptedPreference] = ()) -> str:
        return render_prompt(self.tokenizer, instruction_with_preferences(instruction, prefs), self.prompt_format)

    def prompt_ids(self, text: str) -> list[int]:
        return text_ids(self.tokenizer, text, self.prompt_format)

    def generate(self, texts: Sequence[str], num_samples: int = 1,
                 on_batch: Callable[[list[int], list[list[tuple[str, int]]], int], None] | None = None
                 ) -> tuple[list[list[tuple[str, int]]], list[int]]:
        """Sample `num_samples` responses per text. Returns ([[(response, n_tokens), ...] per text],
        prompt token counts). `on_batch(indices, results, new_tokens)` is called per finished batch."""
        encoded = [self.prompt_ids(t) for t in texts]
        prompt_tokens = [len(ids) for ids in encoded]
        results: list[list[tuple[str, int]]] = [[] for _ in texts]
        order = sorted(range(len(texts)), key=lambda i: (-prompt_tokens[i], i))  # longest first: fail early
        experts = len(self.mix[0]) if self.mix else 1  # a mix decodes each row once per expert
        per_batch = max(1, self.batch_size // (num_samples * experts))
        for start in range(0, len(order), per_batch):
            indices = order[start:start + per_batch]
            rows = [(i, s) for i in indices for s in range(num_samples)]
            outputs, tokens = self._decode([encoded[i] for i, _ in rows], [self.row_seed(texts[i], s) for i, s in rows])
            for k, i in enumerate(indices):
                results[i] = outputs[k * num_samples:(k + 1) * num_samples]
            if num_samples > 1 and self.sampling.temperature > 0:
                tokens += self._make_distinct(texts, encoded, indices, results)
            if on_batch is not None:
                on_batch(indices, [results[i] for i in indices], tokens)
        return results, prompt_tokens

    def row_seed(self, text: str, sample: int, attempt: int = 0) -> int:
        """The seed of one response: the sampling seed, the prompt text, the sample index (and the
        resampling attempt), never the batch it is decoded in."""
        return row_seed(self.sampling.seed, sample, text, attempt)

    def _decode(self, batch_ids: list[list[int]], seeds: list[int]) -> tuple[list, int]:
        import torch

        tok = self.tokenizer
        padded = tok.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        padded = {k: v.to(device) for k, v in padded.items()}
        kwargs = self.sampling.generate_kwargs()
        if self.mix is not None:
            names, mix = self.mix
            k = len(names)
            # Row b decodes as rows b*k .. b*k+k-1, one per expert (each with its own KV cache); the
            # mixing sampler gives all k the token drawn from the mix, so they stay one sequence.
            padded = {key: value.repeat_interleave(k, dim=0) for key, value in padded.items()}
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          adapter_names=[names[j % k] for j in range(padded["input_ids"].shape[0])],
                          logits_processor=[mixing_sampler(self.sampling, seeds, padded["input_ids"].shape[1], mix)])
        elif self.sampling.temperature > 0:
            # Greedy selection of the token a per-row seeded sampler picked (see seeded_sampler).
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=[seeded_sampler(self.sampling, seeds, padded["input_ids"].shape[1])])
        with torch.inference_mode():
            out = self.model.generate(**padded, pad_token_id=tok.pad_token_id, eos_token_id=self._eos_ids(), **kwargs)
        if self.mix is not None:
            out = out[::len(self.mix[0])]
        generated = out[:, padded["input_ids"].shape[1]:].tolist()
        stops = set(self._eos_ids()) | {tok.pad_token_id}
        results, total = [], 0
        for row in generated:
            n = next((j for j, t in enumerate(row) if t in stops), len(row))
            total += min(n + 1, len(row))  # the stop token was generated too
            results.append((tok.decode(row[:n], skip_special_tokens=True).strip(), n))
        return results, total

    def _make_distinct(self, texts: Sequence[str], encoded: list[list[int]], indices: list[int],
                       results: list[list[tuple[str, int]]]) -> int:
        """Resample duplicate responses in place (a few rounds at most); returns tokens generated."""
        total = 0
        for attempt in range(1, MAX_RESAMPLE_ROUNDS + 1):
            todo = []  # (prompt index, sample position)
            for i in indices:
                seen = set()
                for s, (text, _) in enumerate(results[i]):
                    if text in seen:
                        todo.append((i, s))
                    seen.add(text)
            if not todo:
                break
            fresh, tokens = self._decode([encoded[i] for i, _ in todo],
                                         [self.row_seed(texts[i], s, attempt) for i, s in todo])
            total += tokens
            for (i, s), new in zip(todo, fresh, strict=True):
                results[i][s] = new
        return total

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # -- files ----------------------------------------------------------------------------------

    def write_file(self, prompts: Sequence[dict], out_path: str | os.PathLike, *, prefs: Sequence[PromptedPreference] = (),
                   num_samples: int = 1, resume: bool = False, progress: Progress | None = None) -> dict:
        """Generate for every prompt into `out_path` (JSONL, appended per batch, rewritten in prompt
        order when complete). With `resume`, prompts already in the file are skipped; the file must
        have been written with the same settings, and every record in it is kept. Ctrl-C raises
        Interrupted saying how many records were kept."""
        if not prompts:
            raise InputError("no prompts to generate for")
        out_path = Path(out_path)
        combo = combination_name(prefs)
        pref_ids = [p.id for p in prefs]
        sampling = self.sampling.to_record()
        saved: dict[str, dict] = {}
        if resume and out_path.exists():
            current = self._settings(combo, sampling, num_samples)
            instructions = {str(p["id"]): p["instruction"] for p in prompts}
            for record in read_jsonl(out_path):
                _check_resumable(out_path, record, current, instructions)
                saved.setdefault(str(record.get("id")), record)
        asked = {str(p["id"]) for p in prompts}
        done = {key: record for key, record in saved.items() if key in asked}
        todo = [p for p in prompts if str(p["id"]) not in done]
        label = combo or self.system
        start, tokens_total = time.time(), 0
        texts = [self.prompt_text(p["instruction"], prefs) for p in todo]
        prompt_tokens = [len(self.prompt_ids(t)) for t in texts]
        # Drop a torn last line and any duplicate before appending (or start the file).
        _write_records(out_path, saved.values())
        completed = len(prompts) - len(todo)
        if progress:
            progress(label, completed, len(prompts), 0)

        def on_batch(indices, results, new_tokens):
            nonlocal completed, tokens_total
            for i, samples in zip(indices, results, strict=True):
                record = self._record(todo[i], pref_ids, combo, samples, prompt_tokens[i], sampling)
                sink.write(record)
                done[record["id"]] = record
            completed += len(indices)
            tokens_total += new_tokens
            if progress:
                progress(label, completed, len(prompts), tokens_total)

        try:
            with JsonlAppender(out_path) as sink:
                if todo:
                    self.generate(texts, num_samples, on_batch)
            ordered = [done[str(p["id"])] for p in prompts]
            # Records of prompts not asked for this time (a smaller --limit) stay, after the others.
            _write_records(out_path, ordered + [r for key, r in saved.items() if key not in done])
        except KeyboardInterrupt:
            kept = len(done) + len([key for key in saved if key not in done])
            finished = len(done) == len(prompts)
            raise Interrupted(f"{out_path}: {kept} records kept, {len(done)} of the {len(prompts)} prompts asked for"
                              + ("; all written, nothing to resume" if finished else ""),
                              resume=not finished) from None
        seconds = time.time() - start
        distinct = [len(set(r["responses"])) == len(r["responses"]) for r in ordered]
        return {
            "path": str(out_path), "system": self.system, "combo": combo, "prompts": len(prompts),
            "generated": len(todo), "resumed": len(prompts) - len(todo),
            "kept": len(saved) - (len(prompts) - len(todo)), "num_samples": num_samples,
            "tokens": tokens_total, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens_total / seconds, 1) if seconds > 0 else 0.0,
            "distinct_fraction": round(sum(distinct) / len(distinct), 4),
            "mean_response_tokens": round(sum(sum(r["response_tokens"]) for r in ordered)
                                          / max(1, sum(len(r["response_tokens"]) for r in ordered)), 1),
        }

    def _settings(self, combo: str, sampling: dict, num_samples: int) -> dict:
        return resume_settings(self.system, combo, self.weights, self.prompt_format, sampling, num_samples)

    def _record(self, prompt: dict, pref_ids: list[str], combo: str, samples, prompt_tokens: int,
                sampling: dict) -> dict:
        record = {
            "id": str(prompt["id"]), "instruction": prompt["instruction"], "preferences": pref_ids,
            "combo": combo, "system": self.system, "response": samples[0][0],
            "responses": [text for text, _ in samples], "prompt_tokens": prompt_tokens,
            "response_tokens": [n for _, n in samples], "sampling": sampling,
            "prompt_format": self.prompt_format, "weights": self.weights,
        }
        for extra in ("topic", "keyword"):
            if extra in prompt:
                record[extra] = prompt[extra]
        return record


def stand_in_file(job: GenerateJob, path: Path) -> Path:
    """What `job` will write, with every response at its longest (`max_new_tokens` tokens of about 4
    characters): a stand-in to count a judge's requests before the responses exist."""
    combo = combination_name(job.prefs)
    records = []
    for prompt in job.prompts.load():
        # Distinct per system, combination and sample, as real answers are (a judge asks identical requests once).
        responses = [f"({job.system} {combo} {k}) " + "tok " * job.sampling.max_new_tokens
                     for k in range(job.num_samples)]
        records.append({"id": str(prompt["id"]), "instruction": prompt["instruction"], "preferences": [p.id for p in job.prefs],
                        "combo": combo, "system": job.system, "response": responses[0], "responses": responses})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_records(path, records)
    return path


def _write_records(path: Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _record_settings(record: dict) -> dict:
    """What decides a record's responses, flattened for comparison (adapters by content and weight)."""
    weights = record.get("weights") or {}
    adapters = [f"{a.get('sha256')}@{a.get('weight'):g}" for a in weights.get("adapters") or []
                if isinstance(a, dict) and isinstance(a.get("weight"), (int, float))]
    settings = {"system": record.get("system"), "combination": record.get("combo", ""),
                "model": weights.get("model"), "adapters": ", ".join(adapters) or "none",
                "merge method": weights.get("merge_method"), "compose": weights.get("compose", "params"),
                "prompt format": record.get("prompt_format"),
                "samples per prompt": len(record.get("responses") or [])}
    for key, value in (record.get("sampling") or {}).items():
        settings[f"sampling.{key}"] = value
    return settings


def seeded_sampler(sampling: Sampling, seeds: list[int], prompt_length: int):
    """A logits processor that samples each row from its own random stream (rlphf_cli.sampling), and
    leaves only the drawn token finite so `generate`'s greedy step takes it. transformers draws every
    row of a batch from one global generator, so a row's tokens would depend on the rows beside it
    (and a resumed file would differ from an uninterrupted one)."""
    import torch
    from transformers import LogitsProcessor

    rows = torch.stack([uniforms(seed, sampling.max_new_tokens) for seed in seeds])

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            nonlocal rows
            rows = rows.to(scores.device)
            tokens = sample(scores, rows[:, input_ids.shape[1] - prompt_length],
                            sampling.temperature, sampling.top_k, sampling.top_p)
            chosen = torch.full_like(scores, float("-inf"))
            return chosen.scatter_(1, tokens.unsqueeze(1), 0.0)

    return SeededSampler()


def mixing_sampler(sampling: Sampling, seeds: list[int], prompt_length: int, weights: Sequence[float]):
    """The decoding-time mix (MOD, Shi et al. 2024): the scores arrive as k rows per sequence, one
    per expert; each sequence's next token is drawn from sum_i w_i log softmax(scores_i), warped by
    temperature / top_k / top_p and drawn from the row's own random stream as seeded_sampler does
    (greedy: its argmax), and all k rows are given that token."""
    import torch
    from transformers import LogitsProcessor

    greedy = sampling.temperature <= 0
    rows = torch.stack([uniforms(seed, sampling.max_new_tokens) for seed in seeds])
    k = len(weights)
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(1, k, 1)

    class MixingSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            nonlocal rows, w
            rows, w = rows.to(scores.device), w.to(scores.device)
            logp = torch.log_softmax(scores.float(), dim=-1).reshape(-1, k, scores.shape[-1])
            # A token an expert forbids (-inf: min_new_tokens, no_repeat_ngram) stays forbidden.
            mixed = (logp * w).sum(dim=1)
            step = input_ids.shape[1] - prompt_length
            tokens = mixed.argmax(dim=-1) if greedy else sample(mixed, rows[:, step], sampling.temperature,
                                                                sampling.top_k, sampling.top_p)
            chosen = torch.full_like(scores, float("-inf"))
            return chosen.scatter_(1, tokens.repeat_interleave(k).unsqueeze(1), 0.0)

    return MixingSampler()


def resume_settings(system: str, combo: str, weights: dict, prompt_format: str, sampling: dict,
                    num_samples: int) -> dict:
    return _record_settings({"system": system, "combo": combo, "weights": weights, "prompt_format": prompt_format,
                             "sampling": sampling, "responses": [None] * num_samples})


def check_resume(job: GenerateJob, prompts: Sequence[dict]) -> None:
    """Before loading a model: --resume of `job.out` would mix in no record made otherwise."""
    if not job.out.exists():
        return
    current = resume_settings(job.system, combination_name(job.prefs), weights_record(job.model.name, job.weights),
                              job.model.prompt_format, job.sampling.to_record(), job.num_samples)
    instructions = {str(p["id"]): p["instruction"] for p in prompts}
    for record in read_jsonl(job.out):
        _check_resumable(job.out, record, current, instructions)


def _check_resumable(path: Path, record: dict, current: dict, instructions: dict[str, str]) -> None:
    """A record made with other settings (or for another prompt under the same id) cannot be mixed in."""
    saved = _record_settings(record)
    for key, value in current.items():
        if saved.get(key) != value:
            raise InputError(f"{path}: id '{record.get('id')}' was written with {key} {_show(saved.get(key))}, "
                             f"not {_show(value)}; resume with the same settings, or write another --out "
                             "(--force starts the file over)")
    key = str(record.get("id"))
    if key in instructions and record.get("instruction") != instructions[key]:
        raise InputError(f"{path}: id '{key}' has another instruction in the file than in the prompts; "
                         "resume with the same prompts, or write another --out")


def _show(value) -> str:
    return "(not recorded)" if value is None else repr(value) if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------------------------
# Model loading and merging


def load_base_model(model: ModelSpec):
    """(model on the best device, left-padding tokenizer, resolved model name)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlphf_cli.hub import require_model

    transformers.utils.logging.disable_progress_bar()  # the CLI draws its own progress

    name = model.path()
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    quantization = model.quantization_config()
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map="auto")
    require_model(name, model.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(name, dtype=model.torch_dtype(), **kwargs)
    except OSError as exc:
        raise InputError(f"cannot load model '{model.name}': {str(exc).splitlines()[0]}") from None
    if quantization is None:
        loaded.to("cuda" if cuda else "cpu")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return loaded, tokenizer, name


def _merge_soup(weights: Weights, out_dir: Path) -> Path:
    from rlphf_cli.merging import merge_adapters

    return Path(merge_adapters([m.path for m in weights.members], [m.weight for m in weights.members],
                               weights.merge, out_dir=out_dir))


def _load_experts(model, adapter_dirs: Sequence[Path]):
    """The base model with every expert loaded as a named PEFT adapter, unmerged (a mix decodes
    rows with different adapters in one batch): (model, adapter names)."""
    from peft import PeftModel

    names = [f"expert{i}" for i in range(len(adapter_dirs))]
    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:], strict=True):
        peft_model.load_adapter(str(folder), adapter_name=name)
    return peft_model, names


def _apply_adapter(model, adapter_dir: Path, merge: bool):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    if not merge or getattr(model, "is_loaded_in_4bit", False):
        return peft_model
    return peft_model.merge_and_unload()


# --------------------------------------------------------------------------------------------
# Entry points for the CLI and the pipeline


def generate_file(job: GenerateJob, *, prompts: Sequence[dict] | None = None, generator: Generator | None = None,
                  resume: bool = False, progress: Progress | None = None) -> dict:
    """The answers of `job` into its output file (a JSONL record per prompt, appended as they come).

    `prompts`: the job's prompt set, when the caller has loaded it already. Pass a loaded
    `generator` to reuse a model across jobs (its system is set to the job's). Returns a summary
    (path, prompts, generated, resumed, tokens, tokens_per_s, ...).
    """
    prompts = list(prompts) if prompts is not None else job.prompts.load()
    if not prompts:
        raise InputError("no prompts to generate for")
    if generator is None:
        generator = Generator.for_job(job)
    generator.system = job.system
    return generator.write_file(prompts, job.out, prefs=job.prefs, num_samples=job.num_samples, resume=resume,
                                progress=progress)


def generate_files(jobs: Sequence[GenerateJob], *, resume: bool = False, progress: Progress | None = None,
                   after_load: Callable[[], None] | None = None) -> list[dict]:
    """Several jobs of one model and one set of weights (e.g. one file per combination), the model
    loaded once. Prompts and resumable files are checked before it loads; `after_load` runs once it
    has (a command records its run directory then)."""
    if not jobs:
        return []
    first = jobs[0]
    if any((j.model, j.weights) != (first.model, first.weights) for j in jobs):
        raise ValueError("generate_files: every job must decode with the same model and weights")
    prompts = {job.prompts: job.prompts.load() for job in jobs}
    if resume:
        for job in jobs:
            check_resume(job, prompts[job.prompts])
    generator = Generator.for_job(first)
    if after_load is not None:
        after_load()
    return [generate_file(job, prompts=prompts[job.prompts], generator=generator, resume=resume, progress=progress)
            for job in jobs]
