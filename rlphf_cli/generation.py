"""Batched decoding with the base model, one LoRA adapter or a soup of adapters.

An adapter or soup is merged into the weights before decoding (peft's merge_and_unload), so a soup
decodes as fast as the base model. Prompts are sorted by length and left-padded in batches.
Sampling is seeded per prompt and sample: each row of a batch draws its tokens from its own random
stream (a seed from the sampling seed, the prompt text and the sample index), so what a prompt gets
does not depend on which prompts share its batch, on the batch size, or on a resume.
Outputs are JSONL records (see the team's shared format), appended as they are generated, so an
interrupted run resumes (`resume=True`) without duplicate ids and with the same records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlphf_cli import files
from rlphf_cli.errors import InputError, Interrupted, MissingArtifactError
from rlphf_cli.preferences import Preference, PreferenceSet, combination_name, soup_name
from rlphf_cli.prompting import instruction_with_preferences, render_prompt, text_ids
from rlphf_cli.runs import JsonlAppender, RunDir, atomic_write_text, file_sha256, read_jsonl

# progress(label, prompts done, prompts total, tokens generated so far): called after each batch.
Progress = Callable[[str, int, int, int], None]
SoupSpec = str | Sequence[tuple[str, float]]

ADAPTER_CONFIG = "adapter_config.json"
MAX_RESAMPLE_ROUNDS = 3  # extra tries to make a prompt's samples distinct (annotation needs pairs)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe) -> Sampling:
        g = recipe.generate
        return cls(g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.min_new_tokens, g.no_repeat_ngram_size,
                   g.repetition_penalty, recipe.seed)

    def generate_kwargs(self) -> dict:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                                  "repetition_penalty": self.repetition_penalty,
                                  "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def to_record(self) -> dict:
        return asdict(self)


def sample_count(recipe, requested: int | None = None, *, rollouts: bool = False,
                 requested_by: str = "--num-samples", temperature_by: str | None = None) -> tuple[int, str | None]:
    """How many responses per prompt, decided in one place: (count, a note for the summary or None).

    `requested`: an explicit count (a flag); else `generate.num_samples` when the recipe sets it,
    else 1, or for rollouts `annotate.num_samples` (pairs need two). Greedy decoding
    (temperature 0) has one answer per prompt: without an explicit count it gets 1 (said in the
    note); an explicit count above 1 is an error naming both settings.
    """
    greedy = recipe.generate.temperature == 0
    temperature_by = temperature_by or _where(recipe, "generate.temperature")
    if requested is None and "num_samples" in recipe.generate.model_fields_set:
        requested, requested_by = recipe.generate.num_samples, _where(recipe, "generate.num_samples")
    if requested is not None:
        if requested < 1:
            raise InputError(f"{requested_by}: expected at least 1 response per prompt, got {requested}")
        if greedy and requested > 1:
            raise InputError(f"{requested_by} {requested} with {temperature_by} 0: greedy decoding gives one response "
                             f"per prompt; sample with a temperature above 0, or ask for 1")
        return requested, None
    if greedy:
        return 1, "greedy decoding (temperature 0): one response per prompt"
    return (max(recipe.generate.num_samples, recipe.annotate.num_samples) if rollouts
            else recipe.generate.num_samples), None


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


def resolve_adapter(recipe, name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """A folder, or a preference name/id meaning the run's trained policy for it -> (folder, label)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / ADAPTER_CONFIG).is_file():
            raise InputError(f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        return path, path.name
    prefs = recipe.preference_set()
    if str(name_or_path).lower() not in {n.lower() for n in prefs.names()}:
        raise InputError(f"{name_or_path}: no such adapter folder, and not a preference of the recipe "
                         f"(choose from: {', '.join(prefs.names())})")
    pref = prefs.get(str(name_or_path))
    folder = RunDir(recipe.resolved_run_dir()).policy(pref.id)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise MissingArtifactError(f"policy for {pref.id} ({pref.alias})", folder,
                                   f"rlphf train-policy --prefs {pref.alias}")
    return folder, pref.id


def system_name(adapter_label: str | None = None, soup: Sequence[tuple[str, float]] | None = None) -> str:
    if soup:
        return "soup:" + soup_name([label for label, _ in soup], [w for _, w in soup])
    if adapter_label:
        return f"adapter:{adapter_label}"
    return "base"


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


def _where(recipe, key: str) -> str:
    origin = recipe.origin(key)
    return origin if origin.startswith("--") else f"{key} ({origin})"


@dataclass
class Weights:
    """What a generator decodes with, resolved without loading a model: the recipe's base model,
    plus one adapter or a soup of adapters (folder, label, weight)."""

    model: str
    adapter: Path | None = None
    adapter_label: str | None = None
    members: list[tuple[Path, str, float]] = field(default_factory=list)
    merge_method: str | None = None

    @classmethod
    def resolve(cls, recipe, adapter: str | os.PathLike | None = None, soup: SoupSpec | None = None) -> Weights:
        if adapter is not None and soup is not None:
            raise InputError("give an adapter or a soup, not both")
        weights = cls(model=recipe.model.name)
        if soup is not None:
            pairs = parse_soup(soup) if isinstance(soup, str) else list(soup)
            if not pairs:
                raise InputError("the soup has no members")
            for name, weight in pairs:
                folder, label = resolve_adapter(recipe, name)
                weights.members.append((folder, label, float(weight)))
            # Catalog order, as rlphf merge: 'friendly=0.3,concise=0.7' is the soup 'P2A=0.7+P3A=0.3'.
            order = {p.id: i for i, p in enumerate(recipe.preference_set())}
            weights.members.sort(key=lambda m: order.get(m[1], len(order)))
            weights.merge_method = recipe.merge.method
        if adapter is not None:
            weights.adapter, weights.adapter_label = resolve_adapter(recipe, adapter)
        return weights

    def system(self) -> str:
        return system_name(self.adapter_label, [(label, w) for _, label, w in self.members] or None)

    def folders(self) -> list[Path]:
        return [self.adapter] if self.adapter is not None else [m[0] for m in self.members]

    def record(self) -> dict:
        """For each generated record: which weights made it (adapter files by content hash)."""
        weights = [1.0] if self.adapter is not None else [m[2] for m in self.members]
        adapters = [{"path": str(folder), "weight": w, "sha256": _adapter_sha(folder)}
                    for folder, w in zip(self.folders(), weights, strict=True)]
        return {"model": self.model, "adapters": adapters, "merge_method": self.merge_method}


def _adapter_sha(folder: Path) -> str:
    weights = folder / "adapter_model.safetensors"
    return file_sha256(weights)[:16] if weights.is_file() else ""


class Generator:
    """A model ready to decode (any adapter or soup already merged) with its tokenizer and settings."""

    def __init__(self, model, tokenizer, *, system: str, sampling: Sampling, prompt_format: str = "chat",
                 batch_size: int = 32, model_name: str = "", weights: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.sampling = sampling
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.model_name = model_name
        self.weights = weights or {"model": model_name, "adapters": [], "merge_method": None}

    @classmethod
    def load(cls, recipe, *, adapter: str | os.PathLike | None = None, soup: SoupSpec | None = None,
             system: str | None = None, merge: bool = True, weights: Weights | None = None) -> Generator:
        """Load the recipe's model; with `adapter` (a folder or preference name) or `soup`
        ('concise=0.5,friendly=0.5' or [(name or folder, weight), ...]) merge it in first.
        `merge=False` keeps peft's unmerged LoRA layers (for comparison only)."""
        weights = weights or Weights.resolve(recipe, adapter, soup)
        model, tokenizer, model_name = load_base_model(recipe)
        for folder in weights.folders():
            check_adapter_fits(folder, model, model_name)

        if weights.members:
            with tempfile.TemporaryDirectory(prefix="rlphf-soup-") as tmp:
                soup_dir = _merge_soup(recipe, [m[0] for m in weights.members], [m[2] for m in weights.members],
                                       Path(tmp) / "soup")
                model = _apply_adapter(model, soup_dir, merge)
        elif weights.adapter is not None:
            model = _apply_adapter(model, weights.adapter, merge)
        model.eval()
        return cls(model, tokenizer, system=system or weights.system(), sampling=Sampling.from_recipe(recipe),
                   prompt_format=recipe.model.prompt_format, batch_size=recipe.generate.batch_size,
                   model_name=model_name, weights=weights.record())

    # -- decoding -------------------------------------------------------------------------------

    def prompt_text(self, instruction: str, prefs: Sequence[Preference] = ()) -> str:
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
        per_batch = max(1, self.batch_size // num_samples)
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
        key = f"{self.sampling.seed}\0{sample}\0{attempt}\0{text}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def _decode(self, batch_ids: list[list[int]], seeds: list[int]) -> tuple[list, int]:
        import torch

        tok = self.tokenizer
        padded = tok.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        padded = {k: v.to(device) for k, v in padded.items()}
        kwargs = self.sampling.generate_kwargs()
        if self.sampling.temperature > 0:
            # Greedy selection of the token a per-row seeded sampler picked (see seeded_sampler).
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=[seeded_sampler(self.sampling, seeds, padded["input_ids"].shape[1])])
        with torch.inference_mode():
            out = self.model.generate(**padded, pad_token_id=tok.pad_token_id, eos_token_id=self._eos_ids(), **kwargs)
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

    def write_file(self, prompts: Sequence[dict], out_path: str | os.PathLike, *, prefs: Sequence[Preference] = (),
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


def _write_records(path: Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _record_settings(record: dict) -> dict:
    """What decides a record's responses, flattened for comparison (adapters by content and weight)."""
    weights = record.get("weights") or {}
    adapters = [f"{a.get('sha256')}@{a.get('weight'):g}" for a in weights.get("adapters") or []
                if isinstance(a, dict) and isinstance(a.get("weight"), (int, float))]
    settings = {"system": record.get("system"), "combination": record.get("combo", ""),
                "model": weights.get("model"), "adapters": ", ".join(adapters) or "none",
                "merge method": weights.get("merge_method"), "prompt format": record.get("prompt_format"),
                "samples per prompt": len(record.get("responses") or [])}
    for key, value in (record.get("sampling") or {}).items():
        settings[f"sampling.{key}"] = value
    return settings


def seeded_sampler(sampling: Sampling, seeds: list[int], prompt_length: int):
    """A logits processor that samples each row from its own random stream, and leaves only the drawn
    token finite so `generate`'s greedy step takes it. transformers draws every row of a batch from
    one global generator, so a row's tokens would depend on the rows beside it (and a resumed file
    would differ from an uninterrupted one). Temperature, top-k and top-p are applied as
    transformers does; the draw is inverse-CDF sampling with one uniform per row and step."""
    import torch
    from transformers import LogitsProcessor
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    uniforms = torch.stack([torch.rand(sampling.max_new_tokens, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)) for seed in seeds])

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            nonlocal uniforms
            uniforms = uniforms.to(scores.device)
            for warper in warpers:
                scores = warper(input_ids, scores)
            cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
            u = uniforms[:, input_ids.shape[1] - prompt_length] * cdf[:, -1]
            tokens = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
            # Rounding can put u at the very top: take the last token with any probability.
            last = (cdf < cdf[:, -1:]).sum(-1)
            tokens = torch.minimum(tokens, last)
            chosen = torch.full_like(scores, float("-inf"))
            return chosen.scatter_(1, tokens.unsqueeze(1), 0.0)

    return SeededSampler()


def resume_settings(system: str, combo: str, weights: dict, prompt_format: str, sampling: dict,
                    num_samples: int) -> dict:
    return _record_settings({"system": system, "combo": combo, "weights": weights, "prompt_format": prompt_format,
                             "sampling": sampling, "responses": [None] * num_samples})


def check_resume(path: str | os.PathLike, recipe, weights: Weights, system: str, prefs: Sequence[Preference],
                 num_samples: int, prompts: Sequence[dict]) -> None:
    """Before loading a model: --resume of `path` would mix in no record made otherwise."""
    path = Path(path)
    if not path.exists():
        return
    current = resume_settings(system, combination_name(prefs), weights.record(), recipe.model.prompt_format,
                              Sampling.from_recipe(recipe).to_record(), num_samples)
    instructions = {str(p["id"]): p["instruction"] for p in prompts}
    for record in read_jsonl(path):
        _check_resumable(path, record, current, instructions)


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


def load_base_model(recipe):
    """(model on the best device, left-padding tokenizer, resolved model name)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlphf_cli.hub import require_model
    from rlphf_cli.models import resolve_model

    transformers.utils.logging.disable_progress_bar()  # the CLI draws its own progress

    name = resolve_model(recipe.model.name)
    cfg = recipe.model
    cuda = torch.cuda.is_available()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(cfg.dtype, (torch.bfloat16 if cuda else torch.float32))
    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = "auto"
    require_model(name, cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as exc:
        raise InputError(f"cannot load model '{recipe.model.name}': {str(exc).splitlines()[0]}") from None
    if not cfg.load_in_4bit:
        model.to("cuda" if cuda else "cpu")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer, name


def _merge_soup(recipe, adapter_dirs: list[Path], weights: list[float], out_dir: Path) -> Path:
    try:
        from rlphf_cli.merging import merge_adapters
    except ImportError:
        raise InputError("soups need the merging library (rlphf_cli.merging), which is not installed") from None
    params = recipe.merge.model_dump(exclude={"method"}, exclude_none=True)
    return Path(merge_adapters([str(d) for d in adapter_dirs], list(weights), method=recipe.merge.method,
                               out_dir=out_dir, **params))


def _apply_adapter(model, adapter_dir: Path, merge: bool):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    if not merge or getattr(model, "is_loaded_in_4bit", False):
        return peft_model
    return peft_model.merge_and_unload()


# --------------------------------------------------------------------------------------------
# Entry points for the CLI and the pipeline


def generate_file(recipe, prompts: Sequence[dict], out_path: str | os.PathLike, *, prefs: Sequence[Preference] | str = (),
                  adapter: str | os.PathLike | None = None, soup: SoupSpec | None = None, system: str | None = None,
                  num_samples: int | None = None, resume: bool = False, progress: Progress | None = None,
                  generator: Generator | None = None, requested_by: str = "--num-samples") -> dict:
    """Generate responses for `prompts` (records with id, instruction) into one JSONL file.

    `prefs` (Preference objects or 'P1A,concise') are appended to each instruction as the paper did.
    Pass a loaded `generator` to reuse a model across calls; otherwise `adapter`/`soup` pick the
    weights. Returns a summary dict (path, prompts, generated, resumed, tokens, tokens_per_s, ...).
    """
    pref_list = _resolve_prefs(recipe, prefs)
    if not prompts:
        raise InputError("no prompts to generate for")
    num_samples, _ = sample_count(recipe, num_samples, requested_by=requested_by)
    if generator is None:
        generator = Generator.load(recipe, adapter=adapter, soup=soup, system=system)
    elif system:
        generator.system = system
    return generator.write_file(prompts, out_path, prefs=pref_list, num_samples=num_samples, resume=resume,
                                progress=progress)


def generate_combinations(recipe, prompts: Sequence[dict], out_dir: str | os.PathLike, *,
                          combos: str | Sequence[str] = "all", adapter: str | os.PathLike | None = None,
                          soup: SoupSpec | None = None, system: str | None = None, num_samples: int | None = None,
                          resume: bool = False, progress: Progress | None = None,
                          generator: Generator | None = None) -> dict[str, dict]:
    """One file per preference combination, `<out_dir>/<combo>.jsonl` (e.g. P1A+P2A+P3A.jsonl), the
    model loaded once. `combos`: 'all' (every combination of the recipe's preferences) or names."""
    combinations = resolve_combinations(recipe, combos)
    if not prompts:
        raise InputError("no prompts to generate for")
    if generator is None:
        generator = Generator.load(recipe, adapter=adapter, soup=soup, system=system)
    summaries = {}
    for combo in combinations:
        name = combination_name(combo)
        summaries[name] = generate_file(recipe, prompts, Path(out_dir) / f"{name}.jsonl", prefs=combo,
                                        num_samples=num_samples, resume=resume, progress=progress,
                                        generator=generator)
    return summaries


def resolve_combinations(recipe, combos: str | Sequence[str]) -> list[tuple[Preference, ...]]:
    prefs = recipe.preference_set()
    if combos == "all" or combos == ["all"]:
        return prefs.combinations()
    names = [c.strip() for c in combos.split(",")] if isinstance(combos, str) else list(combos)
    out = [prefs.parse_combination(name) for name in names if name]
    if not out:
        raise InputError("no combination given")
    return out


def _resolve_prefs(recipe, prefs: Sequence[Preference] | str) -> list[Preference]:
    if isinstance(prefs, str):
        return recipe.preference_set().resolve(prefs) if prefs.strip() else []
    return list(prefs)
