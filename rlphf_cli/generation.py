"""Batched decoding with the base model, one LoRA adapter or a soup of adapters.

An adapter or soup is merged into the weights before decoding (peft's merge_and_unload), so a soup
decodes as fast as the base model. Prompts are sorted by length and left-padded in batches.
Outputs are JSONL records (see the team's shared format), appended as they are generated, so an
interrupted run resumes (`resume=True`) without duplicate ids.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlphf_cli.errors import InputError, MissingArtifactError
from rlphf_cli.preferences import Preference, PreferenceSet, combination_name
from rlphf_cli.prompting import instruction_with_preferences, render_prompt, text_ids
from rlphf_cli.runs import JsonlAppender, RunDir, atomic_write_text, read_jsonl

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
        uniform = len({round(w, 9) for _, w in soup}) == 1
        return "soup:" + "+".join(label if uniform else f"{label}={w:g}" for label, w in soup)
    if adapter_label:
        return f"adapter:{adapter_label}"
    return "base"


def check_adapter_fits(adapter_dir: Path, model, model_name: str) -> None:
    """Raise InputError when the adapter was made for another base model (or is not a causal LM
    adapter), before peft fails with a long size-mismatch traceback."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{adapter_dir}: unreadable {ADAPTER_CONFIG} ({exc})") from None
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


class Generator:
    """A model ready to decode (any adapter or soup already merged) with its tokenizer and settings."""

    def __init__(self, model, tokenizer, *, system: str, sampling: Sampling, prompt_format: str = "chat",
                 batch_size: int = 32, model_name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.sampling = sampling
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.model_name = model_name

    @classmethod
    def load(cls, recipe, *, adapter: str | os.PathLike | None = None, soup: SoupSpec | None = None,
             system: str | None = None, merge: bool = True) -> Generator:
        """Load the recipe's model; with `adapter` (a folder or preference name) or `soup`
        ('concise=0.5,friendly=0.5' or [(name or folder, weight), ...]) merge it in first.
        `merge=False` keeps peft's unmerged LoRA layers (for comparison only)."""
        if adapter is not None and soup is not None:
            raise InputError("give an adapter or a soup, not both")
        members: list[tuple[Path, str, float]] = []
        if soup is not None:
            pairs = parse_soup(soup) if isinstance(soup, str) else list(soup)
            if not pairs:
                raise InputError("the soup has no members")
            for name, weight in pairs:
                folder, label = resolve_adapter(recipe, name)
                members.append((folder, label, float(weight)))
            # Catalog order, as rlphf merge: 'friendly=0.3,concise=0.7' is the soup 'P2A=0.7+P3A=0.3'.
            order = {p.id: i for i, p in enumerate(recipe.preference_set())}
            members.sort(key=lambda m: order.get(m[1], len(order)))
        adapter_dir = adapter_label = None
        if adapter is not None:
            adapter_dir, adapter_label = resolve_adapter(recipe, adapter)

        model, tokenizer, model_name = load_base_model(recipe)
        for folder in [adapter_dir] + [m[0] for m in members]:
            if folder is not None:
                check_adapter_fits(folder, model, model_name)

        if members:
            with tempfile.TemporaryDirectory(prefix="rlphf-soup-") as tmp:
                soup_dir = _merge_soup(recipe, [m[0] for m in members], [m[2] for m in members], Path(tmp) / "soup")
                model = _apply_adapter(model, soup_dir, merge)
        elif adapter_dir is not None:
            model = _apply_adapter(model, adapter_dir, merge)
        model.eval()
        name = system or system_name(adapter_label, [(m[1], m[2]) for m in members] or None)
        return cls(model, tokenizer, system=name, sampling=Sampling.from_recipe(recipe),
                   prompt_format=recipe.model.prompt_format, batch_size=recipe.generate.batch_size,
                   model_name=model_name)

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
            outputs, tokens = self._decode([encoded[i] for i in indices], num_samples, seed_offset=start)
            for k, i in enumerate(indices):
                results[i] = outputs[k * num_samples:(k + 1) * num_samples]
            if num_samples > 1 and self.sampling.temperature > 0:
                tokens += self._make_distinct([encoded[i] for i in indices], [results[i] for i in indices], start)
            if on_batch is not None:
                on_batch(indices, [results[i] for i in indices], tokens)
        return results, prompt_tokens

    def _decode(self, batch_ids: list[list[int]], num_samples: int, seed_offset: int) -> tuple[list, int]:
        import torch

        tok = self.tokenizer
        padded = tok.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        padded = {k: v.to(device) for k, v in padded.items()}
        # Seeded per batch: the same prompts and settings give the same samples.
        torch.manual_seed(self.sampling.seed * 1_000_003 + seed_offset)
        with torch.inference_mode():
            out = self.model.generate(**padded, num_return_sequences=num_samples, pad_token_id=tok.pad_token_id,
                                      eos_token_id=self._eos_ids(), **self.sampling.generate_kwargs())
        generated = out[:, padded["input_ids"].shape[1]:].tolist()
        stops = set(self._eos_ids()) | {tok.pad_token_id}
        results, total = [], 0
        for row in generated:
            n = next((j for j, t in enumerate(row) if t in stops), len(row))
            total += min(n + 1, len(row))  # the stop token was generated too
            results.append((tok.decode(row[:n], skip_special_tokens=True).strip(), n))
        return results, total

    def _make_distinct(self, batch_ids: list[list[int]], samples: list[list[tuple[str, int]]], seed_offset: int) -> int:
        """Resample duplicate responses in place (a few rounds at most); returns tokens generated."""
        total = 0
        for round_ in range(1, MAX_RESAMPLE_ROUNDS + 1):
            todo = []  # (prompt position, sample position)
            for p, group in enumerate(samples):
                seen = set()
                for s, (text, _) in enumerate(group):
                    if text in seen:
                        todo.append((p, s))
                    seen.add(text)
            if not todo:
                break
            fresh, tokens = self._decode([batch_ids[p] for p, _ in todo], 1, seed_offset + 7919 * round_)
            total += tokens
            for (p, s), new in zip(todo, fresh, strict=True):
                samples[p][s] = new
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
        order when complete). With `resume`, prompts already in the file are skipped."""
        if not prompts:
            raise InputError("no prompts to generate for")
        out_path = Path(out_path)
        combo = combination_name(prefs)
        done: dict[str, dict] = {}
        if resume and out_path.exists():
            for record in read_jsonl(out_path):
                if record.get("system") != self.system or record.get("combo", "") != combo:
                    raise InputError(f"{out_path}: written for system '{record.get('system')}', combination "
                                     f"'{record.get('combo', '')}', not '{self.system}', '{combo}'; "
                                     "use another --out or drop --resume")
                done.setdefault(str(record.get("id")), record)
            # Drop a torn last line and any duplicate before appending.
            atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
        todo = [p for p in prompts if str(p["id"]) not in done]
        label = combo or self.system
        start, tokens_total = time.time(), 0
        texts = [self.prompt_text(p["instruction"], prefs) for p in todo]
        if not resume or not out_path.exists():
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text("")
        completed = len(prompts) - len(todo)
        if progress:
            progress(label, completed, len(prompts), 0)
        pref_ids = [p.id for p in prefs]
        sampling = self.sampling.to_record()

        with JsonlAppender(out_path) as sink:
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

            prompt_tokens = [len(self.prompt_ids(t)) for t in texts]
            if todo:
                self.generate(texts, num_samples, on_batch)
        ordered = [done[str(p["id"])] for p in prompts]
        atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        seconds = time.time() - start
        distinct = [len(set(r["responses"])) == len(r["responses"]) for r in ordered]
        return {
            "path": str(out_path), "system": self.system, "combo": combo, "prompts": len(prompts),
            "generated": len(todo), "resumed": len(prompts) - len(todo), "num_samples": num_samples,
            "tokens": tokens_total, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens_total / seconds, 1) if seconds > 0 else 0.0,
            "distinct_fraction": round(sum(distinct) / len(distinct), 4),
            "mean_response_tokens": round(sum(sum(r["response_tokens"]) for r in ordered)
                                          / max(1, sum(len(r["response_tokens"]) for r in ordered)), 1),
        }

    def _record(self, prompt: dict, pref_ids: list[str], combo: str, samples, prompt_tokens: int,
                sampling: dict) -> dict:
        record = {
            "id": str(prompt["id"]), "instruction": prompt["instruction"], "preferences": pref_ids,
            "combo": combo, "system": self.system, "response": samples[0][0],
            "responses": [text for text, _ in samples], "prompt_tokens": prompt_tokens,
            "response_tokens": [n for _, n in samples], "sampling": sampling,
        }
        for extra in ("topic", "keyword"):
            if extra in prompt:
                record[extra] = prompt[extra]
        return record


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
                  generator: Generator | None = None) -> dict:
    """Generate responses for `prompts` (records with id, instruction) into one JSONL file.

    `prefs` (Preference objects or 'P1A,concise') are appended to each instruction as the paper did.
    Pass a loaded `generator` to reuse a model across calls; otherwise `adapter`/`soup` pick the
    weights. Returns a summary dict (path, prompts, generated, resumed, tokens, tokens_per_s, ...).
    """
    pref_list = _resolve_prefs(recipe, prefs)
    if not prompts:
        raise InputError("no prompts to generate for")
    num_samples = num_samples or recipe.generate.num_samples
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
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
