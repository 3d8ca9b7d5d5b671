"""Making a soup: validate every input, merge module by module, write the folder atomically."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    torch_dtype,
)
from rlphf_cli.merging.methods import METHODS, MergeMethod, merge_full
from rlphf_cli.runs import atomic_dir

Progress = Callable[[int, int], None]
TensorReader = Callable[[int, str], Any]  # (input index, tensor key) -> tensor


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


def _file_reader(handles, inputs: list[AdapterInput]) -> TensorReader:
    from safetensors import SafetensorError

    def read(index: int, key: str):
        try:
            return handles[index].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise InputError(f"{inputs[index].weights_file}: cannot read tensor {key} "
                             f"({str(exc).splitlines()[0]})") from None

    return read


@dataclass
class MergePlan:
    """A checked merge: the method with its weights, the inputs, and the shape of the output."""

    merger: MergeMethod
    inputs: list[AdapterInput]
    given: list[float]  # the user's weights
    used: list[float]  # the weights the formula uses (e.g. normalized)
    ranks: dict[str, int]  # module -> output rank

    @property
    def modules(self) -> list[str]:
        return sorted(self.inputs[0].modules)

    @property
    def full_keys(self) -> list[str]:
        return sorted(self.inputs[0].full)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, safetensors dtype, shape) of every output tensor, in the order merged_tensors yields them."""
        first = self.inputs[0]
        entries = []
        for name in self.modules:
            mod, r = first.modules[name], self.ranks[name]
            entries.append((mod.a_key, first.dtypes[mod.a_key], (r, *mod.a_shape[1:])))
            entries.append((mod.b_key, first.dtypes[mod.b_key], (mod.b_shape[0], r, *mod.b_shape[2:])))
        return entries + [(key, first.dtypes[key], first.full[key]) for key in self.full_keys]

    def config(self) -> dict:
        """The merged adapter's adapter_config.json."""
        return output_config(self.inputs[0], self.ranks if self.merger.folds_scale else None)


def plan_merge(adapters: Sequence[AdapterInput | str | Path], weights: str | Sequence[float] | None = None,
               method: str = "average", *, force: bool = False, **params) -> MergePlan:
    """Check a merge before any tensor is read: method and parameters, weights, then the inputs
    (folders are read here; AdapterInput objects already were) and their compatibility."""
    if not adapters:
        raise InputError("no adapters to merge")
    merger = METHODS.get(method)(**params)
    given = parse_weights(weights, len(adapters))
    used = merger.check_weights(given)
    inputs = [a if isinstance(a, AdapterInput) else read_adapter(a) for a in adapters]
    check_compatible(inputs, same_rank=merger.same_rank, same_scale=merger.same_scale,
                     factor_methods=method != "average", method=method, force=force)
    merger.prepare(inputs)
    ranks = {name: merger.output_rank([a.modules[name].rank for a in inputs]) for name in sorted(inputs[0].modules)}
    return MergePlan(merger, inputs, given, used, ranks)


def merged_tensors(plan: MergePlan, read: TensorReader, progress: Progress | None = None) -> Iterator[tuple[str, Any]]:
    """The merged adapter's (key, tensor) pairs in `plan.entries()` order, one module at a time.

    `read(i, key)` returns input i's tensor `key`, from a file or from memory: `rlphf merge` and
    `rlphf serve` both make their soups here, so a soup is the same tensors whichever made it.
    Callers run it under _single_thread(), so the floating-point result does not depend on the
    number of threads.
    """
    plan_inputs, merger, used = plan.inputs, plan.merger, plan.used
    first = plan_inputs[0]
    count = range(len(plan_inputs))
    total = len(plan.modules) + len(plan.full_keys)
    for done, name in enumerate(plan.modules, 1):
        As = [read(i, plan_inputs[i].modules[name].a_key) for i in count]
        Bs = [read(i, plan_inputs[i].modules[name].b_key) for i in count]
        A, B = merger.merge_module(name, As, Bs, [a.scale(name) for a in plan_inputs], used)
        mod = first.modules[name]
        yield mod.a_key, A.to(torch_dtype(first.dtypes[mod.a_key]))
        yield mod.b_key, B.to(torch_dtype(first.dtypes[mod.b_key]))
        if progress:
            progress(done, total)
    for done, key in enumerate(plan.full_keys, len(plan.modules) + 1):
        yield key, merge_full([read(i, key) for i in count], used).to(torch_dtype(first.dtypes[key]))
        if progress:
            progress(done, total)
    merger.finish()


def merge_in_memory(adapters: Sequence[AdapterInput], tensors: Sequence[Mapping[str, Any]],
                    weights: str | Sequence[float] | None = None, method: str = "average", *, force: bool = False,
                    **params) -> tuple[dict[str, Any], dict]:
    """The soup of adapters whose tensors are already loaded (`tensors[i]`: key -> tensor of
    adapters[i], as in its safetensors file): (state dict, adapter config), the same tensors that
    merge_adapters writes for the same inputs, weights and method."""
    plan = plan_merge(adapters, weights, method, force=force, **params)

    def read(index: int, key: str):
        return tensors[index][key]

    with _single_thread():
        return dict(merged_tensors(plan, read)), plan.config()


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
    plan = plan_merge(dirs, weights, method, force=force, **params)
    inputs = plan.inputs
    out = check_out_dir(out_dir, inputs)

    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out))  # removed on any error: nothing is left behind
        # Hashing (for the card) overlaps with the merge: hashlib releases the GIL.
        hashing = stack.enter_context(ThreadPoolExecutor(max_workers=1)).submit(hash_inputs, inputs)
        stack.enter_context(_single_thread())
        handles = [stack.enter_context(safe_open(str(a.weights_file), framework="pt")) for a in inputs]
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, plan.entries(), {"format": "pt"})
        stack.callback(writer.release)
        for key, tensor in merged_tensors(plan, _file_reader(handles, inputs), progress):
            writer.write(key, tensor)
        writer.close()
        hashing.result()
        config = plan.config()
        card = build_card(plan.merger, inputs, plan.given, plan.used, config, len(plan.full_keys),
                          time.perf_counter() - start, card_extra)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copy_tokenizer(inputs[0].path, tmp)
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
    otherwise). Method and parameters come from the recipe's `merge` section; `explicit` names the
    parameters the user set on the command line (an error if the method does not use them). A
    finished soup of the run directory is replaced only with `replace`. Returns the merge card plus
    'out' (and 'into_base')."""
    from rlphf_cli.preferences import combination_name, soup_name
    from rlphf_cli.runs import RunDir, check_outputs

    method = recipe.merge.method
    method_cls = METHODS.get(method)
    for name in explicit:
        if name not in method_cls.params:
            users = [m for m in METHODS.names() if name in METHODS.get(m).params]
            raise InputError(f"--{name} does not apply to --merge-method {method} (it is for {', '.join(users)})")
    params = {k: getattr(recipe.merge, k) for k in method_cls.params if getattr(recipe.merge, k) is not None}
    if into_base is not None:
        check_model_out(into_base)
    adapters = list(adapters or [])
    if adapters and prefs:
        raise InputError("give adapter folders or --soup, not both")
    run = None
    extra = None
    if adapters:
        if out_dir is None:
            raise InputError("--out is required when merging adapter folders (it defaults to soups/<combo>/ "
                             "only with --soup)")
        dirs = adapters
    else:
        run = RunDir(recipe.resolved_run_dir())
        available = recipe.preference_set()
        if not prefs:  # merging every policy found would mix opposite preferences of each dimension
            raise InputError("nothing to merge: name the preferences, e.g. --soup concise=0.5,friendly=0.5")
        chosen = available.resolve(prefs)
        parsed = parse_weights(weights, len(chosen))
        order = {p.id: i for i, p in enumerate(available)}
        # Catalog order, so 'friendly,concise' and 'concise,friendly' name the same soup.
        pairs = sorted(zip(chosen, parsed, strict=True), key=lambda pw: order[pw[0].id])
        chosen, weights = [p for p, _ in pairs], [w for _, w in pairs]
        for pref in chosen:
            if not (run.policy(pref.id) / CONFIG_FILE).is_file():
                raise MissingArtifactError(f"policy for {pref.id} ({pref.alias})", run.policy(pref.id),
                                           f"rlphf train-policy --prefs {pref.alias}")
        combo = combination_name(chosen)
        dirs = [run.policy(p.id) for p in chosen]
        # Named by the weights the method uses: average at 0.5/0.5/0.5 is the equal-share soup.
        out_dir = out_dir or run.soup(soup_name([p.id for p in chosen], method_cls(**params).check_weights(weights)))
        extra = {"preferences": [p.id for p in chosen], "combo": combo}

    def merge() -> Path:
        return merge_adapters(dirs, weights, method, out_dir, force=force, progress=progress, card_extra=extra,
                              **params)

    record = check_outputs(recipe, [Path(out_dir)], force=replace, hint="pass --force to replace it, or --out")
    if record is not None:
        record.begin(recipe)
        with record.stage(f"merge/{Path(out_dir).name}", method=method, weights=list(weights)):
            out = merge()
    else:
        out = merge()
    result = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
    result["out"] = str(out)
    if into_base is not None:
        result["into_base"] = str(merge_into_base(out, into_base, base_model))
    return result
