"""Making a soup: validate every input, merge module by module, write the folder atomically."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError, MissingArtifactError
from rlphf_cli.merging.card import build_card
from rlphf_cli.merging.io import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterInput,
    SafetensorsWriter,
    check_compatible,
    check_out_dir,
    copy_tokenizer,
    hash_inputs,
    output_config,
    read_adapter,
)
from rlphf_cli.merging.methods import METHODS, merge_full
from rlphf_cli.runs import atomic_dir

Progress = Callable[[int, int], None]


def parse_weights(weights: str | Sequence[float] | None, count: int) -> list[float]:
    """'0.4,0.3,0.3' or [0.4, 0.3, 0.3] -> floats; None -> uniform. Checks count and finiteness."""
    if weights is None:
        return [1.0 / count] * count
    parts = [p.strip() for p in weights.split(",")] if isinstance(weights, str) else list(weights)
    values = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise InputError(f"--weights: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise InputError(f"--weights: weight {part} is not finite")
        values.append(value)
    if len(values) != count:
        raise InputError(f"--weights: {len(values)} weight{'s' if len(values) != 1 else ''} for "
                         f"{count} adapter{'s' if count != 1 else ''}")
    return values


@contextlib.contextmanager
def _single_thread():
    """One torch thread while merging: each op touches one module's factors (memory-bound), and on a
    shared machine intra-op threads stall each other (measured 10x slower with 2 threads at load 8)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_all(handles, inputs: list[AdapterInput], key_of) -> list:
    from safetensors import SafetensorError

    tensors = []
    for handle, adapter in zip(handles, inputs, strict=True):
        try:
            tensors.append(handle.get_tensor(key_of(adapter)))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise InputError(f"{adapter.weights_file}: cannot read tensor {key_of(adapter)} "
                             f"({str(exc).splitlines()[0]})") from None
    return tensors


def merge_adapters(
    adapter_dirs: Sequence[str | Path],
    weights: str | Sequence[float] | None = None,
    method: str = "average",
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    card_extra: dict | None = None,
    **params,
) -> Path:
    """Merge PEFT LoRA adapter folders into `out_dir` (adapter_config.json, adapter_model.safetensors,
    soup.json, and the first input's tokenizer files). Returns `out_dir`.

    params: rank (svd), density (ties, dare), seed (dare); a parameter a method does not use is
    ignored (so callers may pass the recipe's whole `merge` section). Only the adapter files are
    read, one module at a time, and each merged module is written out at once, so peak memory is
    one module's tensors (inputs + output), not the adapters' size. Every check runs before
    anything is written; the folder appears only when complete (temporary folder + rename).
    """
    start = time.perf_counter()
    dirs = list(adapter_dirs)
    if not dirs:
        raise InputError("no adapters to merge")
    if out_dir is None:
        raise InputError("no output folder given (--out)")
    merger = METHODS.get(method)(**params)
    given = parse_weights(weights, len(dirs))
    used = merger.check_weights(given)
    inputs = [read_adapter(d) for d in dirs]
    check_compatible(inputs, same_rank=merger.same_rank, same_scale=merger.same_scale,
                     factor_methods=method != "average", method=method, force=force)
    out = check_out_dir(out_dir, inputs)

    from safetensors import safe_open

    first = inputs[0]
    merger.prepare(inputs)
    names = sorted(first.modules)
    full_keys = sorted(first.full)
    total = len(names) + len(full_keys)
    ranks = {name: merger.output_rank([a.modules[name].rank for a in inputs]) for name in names}
    entries = []
    for name in names:
        mod, r = first.modules[name], ranks[name]
        entries.append((mod.a_key, first.dtypes[mod.a_key], (r, *mod.a_shape[1:])))
        entries.append((mod.b_key, first.dtypes[mod.b_key], (mod.b_shape[0], r, *mod.b_shape[2:])))
    entries += [(key, first.dtypes[key], first.full[key]) for key in full_keys]

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out))  # removed on any error: nothing is left behind
        # Hashing (for the card) overlaps with the merge: hashlib releases the GIL.
        hashing = stack.enter_context(ThreadPoolExecutor(max_workers=1)).submit(hash_inputs, inputs)
        stack.enter_context(_single_thread())
        handles = [stack.enter_context(safe_open(str(a.weights_file), framework="pt")) for a in inputs]
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, entries, {"format": "pt"})
        stack.callback(writer.release)
        for done, name in enumerate(names, 1):
            As = _read_all(handles, inputs, lambda a, name=name: a.modules[name].a_key)
            Bs = _read_all(handles, inputs, lambda a, name=name: a.modules[name].b_key)
            A, B = merger.merge_module(name, As, Bs, [a.scale(name) for a in inputs], used)
            writer.write(first.modules[name].a_key, A)
            writer.write(first.modules[name].b_key, B)
            if progress:
                progress(done, total)
        for done, key in enumerate(full_keys, len(names) + 1):
            writer.write(key, merge_full(_read_all(handles, inputs, lambda a, key=key: key), used))
            if progress:
                progress(done, total)
        writer.close()
        hashing.result()
        merger.finish()
        config = output_config(first, ranks if merger.folds_scale else None)
        card = build_card(merger, inputs, given, used, config, len(full_keys), time.perf_counter() - start,
                          card_extra)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copy_tokenizer(first.path, tmp)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return out


def check_model_out(out_dir: str | Path) -> Path:
    """The --into-base folder is replaced whole: refuse anything but a model folder or an empty one."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise InputError(f"{out}: exists and is not a model folder; choose another --into-base or remove it")
    return out


_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification"}


def merge_into_base(soup_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write a full model: the base (`base_model`, else the soup's base_model_name_or_path) with the
    soup merged into its weights (transformers + peft merge_and_unload). Loads the base model."""
    soup = Path(soup_dir)
    config = files.read_json_object(soup / CONFIG_FILE, "adapter config")
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{soup / CONFIG_FILE}: no base_model_name_or_path; name the base model with --model")
    task = config.get("task_type") or "CAUSAL_LM"
    if task not in _TASK_CLASSES:
        raise InputError(f"--into-base: task type {task} is not supported (only {', '.join(_TASK_CLASSES)})")
    out = check_model_out(out_dir)

    import transformers
    from peft import PeftModel

    from rlphf_cli.models import resolve_model

    base = resolve_model(base)
    kwargs = {}
    if task == "SEQ_CLS":
        from safetensors import safe_open

        with safe_open(str(soup / WEIGHTS_FILE), framework="pt") as handle:
            heads = [k for k in handle.keys() if k.endswith(("score.weight", "classifier.weight"))]
            if heads:
                kwargs["num_labels"] = handle.get_slice(heads[0]).get_shape()[0]
    try:
        model = getattr(transformers, _TASK_CLASSES[task]).from_pretrained(base, dtype="auto", **kwargs)
    except OSError as exc:
        raise InputError(f"--into-base: cannot load the base model {base!r}: {str(exc).splitlines()[0]}") from None
    merged = PeftModel.from_pretrained(model, str(soup)).merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        if not copy_tokenizer(soup, tmp):
            with contextlib.suppress(Exception):  # a base without a tokenizer still yields a model
                transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return out


def merge_from_recipe(
    recipe,
    adapters: Sequence[str | Path] | None = None,
    prefs: str | Sequence[str] | None = None,
    weights: str | Sequence[float] | None = None,
    *,
    out_dir: str | Path | None = None,
    force: bool = False,
    into_base: str | Path | None = None,
    base_model: str | None = None,
    explicit: Sequence[str] = (),
    progress: Progress | None = None,
    replace: bool = False,
) -> dict:
    """`rlphf merge`: adapter folders (with out_dir), or preferences resolved to the run directory's
    policy/<id>/ folders (default out_dir: soups/<combo>/ for equal shares, soups/<id>=<w>+.../
    otherwise). With neither, every per-preference policy found in the run directory. Method and
    parameters come from the recipe's `merge` section; `explicit` names the parameters the user set
    on the command line (an error if the method does not use them). A finished soup of the run
    directory is replaced only with `replace`. Returns the merge card plus 'out' (and 'into_base')."""
    from rlphf_cli.preferences import combination_name, soup_name
    from rlphf_cli.runs import RunDir, check_outputs

    method = recipe.merge.method
    method_cls = METHODS.get(method)
    for name in explicit:
        if name not in method_cls.params:
            users = [m for m in METHODS.names() if name in METHODS.get(m).params]
            raise InputError(f"--{name} does not apply to --method {method} (it is for {', '.join(users)})")
    params = {k: getattr(recipe.merge, k) for k in method_cls.params if getattr(recipe.merge, k) is not None}
    if into_base is not None:
        check_model_out(into_base)
    adapters = list(adapters or [])
    if adapters and prefs:
        raise InputError("give adapter folders or --prefs, not both")
    run = None
    extra = None
    if adapters:
        if out_dir is None:
            raise InputError("--out is required when merging adapter folders (it defaults to soups/<combo>/ "
                             "only with --prefs)")
        dirs = adapters
    else:
        run = RunDir(recipe.resolved_run_dir())
        available = recipe.preference_set()
        if prefs:
            chosen = available.resolve(prefs)
        else:
            chosen = [p for p in available if (run.policy(p.id) / CONFIG_FILE).is_file()]
            if not chosen:
                raise MissingArtifactError("per-preference policies", run.path("policy"),
                                           "rlphf train-policy --pref all")
        try:
            parsed = parse_weights(weights, len(chosen))
        except InputError as exc:
            if prefs or "weights for" not in str(exc):
                raise
            found = ", ".join(p.id for p in chosen)
            raise InputError(f"{exc} (the trained policies found: {found}); pick some with --prefs") from None
        order = {p.id: i for i, p in enumerate(available)}
        # Catalog order, so 'friendly,concise' and 'concise,friendly' name the same soup.
        pairs = sorted(zip(chosen, parsed, strict=True), key=lambda pw: order[pw[0].id])
        chosen, weights = [p for p, _ in pairs], [w for _, w in pairs]
        for pref in chosen:
            if not (run.policy(pref.id) / CONFIG_FILE).is_file():
                raise MissingArtifactError(f"policy for {pref.id} ({pref.alias})", run.policy(pref.id),
                                           f"rlphf train-policy --pref {pref.alias}")
        combo = combination_name(chosen)
        dirs = [run.policy(p.id) for p in chosen]
        out_dir = out_dir or run.soup(soup_name([p.id for p in chosen], weights))
        extra = {"preferences": [p.id for p in chosen], "combo": combo}

    def merge() -> Path:
        return merge_adapters(dirs, weights, method, out_dir, force=force, progress=progress, card_extra=extra,
                              **params)

    record = check_outputs(recipe, [Path(out_dir)], force=replace, hint="pass --force to replace it, or --out")
    if record is not None:
        record.begin(recipe)
    if record is not None:
        with record.stage(f"merge/{Path(out_dir).name}", method=method, weights=list(weights)):
            out = merge()
    else:
        out = merge()
    result = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
    result["out"] = str(out)
    if into_base is not None:
        result["into_base"] = str(merge_into_base(out, into_base, base_model))
    return result
