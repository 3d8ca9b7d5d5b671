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
from rlphf_cli.errors import InputError
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
from rlphf_cli.merging.methods import MergeMethod, merge_full, merge_spec
from rlphf_cli.merging.methods import merger as new_merger
from rlphf_cli.runs import atomic_dir
from rlphf_cli.specs import MergeJob, MergeSpec

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
    kept: list[int]  # indices of the inputs given that went in (those of weight 0 are dropped)

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


def as_merge_spec(method: MergeSpec | str, params: Mapping[str, Any]) -> MergeSpec:
    """A MergeSpec as given, or a method name with its parameters (a parameter the method does not
    declare is ignored, so callers may pass every merge setting they have)."""
    if isinstance(method, MergeSpec):
        if params:
            raise InputError("give the merge parameters in the MergeSpec, not beside it")
        return method
    return merge_spec(method, params)


def plan_merge(adapters: Sequence[AdapterInput | str | Path], weights: str | Sequence[float] | None = None,
               method: MergeSpec | str = "average", *, force: bool = False, **params) -> MergePlan:
    """Check a merge before any tensor is read: method and parameters, weights, then the inputs
    (folders are read here; AdapterInput objects already were) and their compatibility."""
    if not adapters:
        raise InputError("no adapters to merge")
    spec = as_merge_spec(method, params)
    method = spec.method
    merger = new_merger(spec)
    given = parse_weights(weights, len(adapters))
    kept = nonzero(given)
    given = [given[i] for i in kept]
    used = merger.check_weights(given)
    inputs = [a if isinstance(a, AdapterInput) else read_adapter(a) for a in (adapters[i] for i in kept)]
    check_compatible(inputs, same_rank=merger.same_rank, same_scale=merger.same_scale,
                     factor_methods=method != "average", method=method, force=force)
    merger.prepare(inputs)
    ranks = {name: merger.output_rank([a.modules[name].rank for a in inputs]) for name in sorted(inputs[0].modules)}
    return MergePlan(merger, inputs, given, used, ranks, kept)


def nonzero(weights: Sequence[float]) -> list[int]:
    """The indices of the members that go into a soup: a member at weight 0 is dropped before any
    method sees it (it would still vote on TIES' signs, add rank to `exact`, or draw DARE masks)."""
    kept = [i for i, w in enumerate(weights) if w != 0]
    if not kept:
        raise InputError("--weights: every weight is 0; give at least one member a non-zero weight")
    return kept


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
                    weights: str | Sequence[float] | None = None, method: MergeSpec | str = "average", *,
                    force: bool = False, **params) -> tuple[dict[str, Any], dict]:
    """The soup of adapters whose tensors are already loaded (`tensors[i]`: key -> tensor of
    adapters[i], as in its safetensors file): (state dict, adapter config), the same tensors that
    merge_adapters writes for the same inputs, weights and method."""
    plan = plan_merge(adapters, weights, method, force=force, **params)

    def read(index: int, key: str):
        return tensors[plan.kept[index]][key]

    with _single_thread():
        return dict(merged_tensors(plan, read)), plan.config()


def merge_adapters(
    adapter_dirs: Sequence[str | Path],
    weights: str | Sequence[float] | None = None,
    method: MergeSpec | str = "average",
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    card_extra: dict | None = None,
    **params,
) -> Path:
    """Merge PEFT LoRA adapter folders into `out_dir` (adapter_config.json, adapter_model.safetensors,
    soup.json, and the first input's tokenizer files). Returns `out_dir`.

    `method`: a MergeSpec, or a method name with its `params`: rank (svd), density (ties, dare),
    seed (dare); a parameter the method does not use is ignored. Only the adapter files are
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
        dropped = [str(dirs[i]) for i in range(len(dirs)) if i not in plan.kept]
        card = build_card(plan.merger, inputs, plan.given, plan.used, config, len(plan.full_keys),
                          time.perf_counter() - start, {**(card_extra or {}), **({"dropped_weight_0": dropped} if dropped else {})})
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


def run_merge(job: MergeJob, *, force: bool = False, replace: bool = False,
              progress: Progress | None = None) -> dict:
    """`rlphf merge` and the pipeline's soups: merge `job.inputs` into `job.out`, recorded in the run
    directory when it lies there (a finished soup of the run directory is replaced only with
    `replace`); with `job.into_base`, also a full model. `force` merges adapters whose
    base_model_name_or_path differ. Returns the merge card plus 'out' (and 'into_base')."""
    from rlphf_cli.runs import begin_outputs

    if job.into_base is not None:
        check_model_out(job.into_base)
    extra = {"preferences": list(job.labels), "combo": "+".join(job.labels)} if job.labels else None

    def merge() -> Path:
        return merge_adapters(job.inputs, list(job.weights), job.merge, job.out, force=force, progress=progress,
                              card_extra=extra)

    run = begin_outputs(job.record, [job.out], force=replace, hint="pass --force to replace it, or --out")
    if run is not None:
        with run.stage(f"merge/{job.out.name}", method=job.merge.method, weights=list(job.weights)):
            out = merge()
    else:
        out = merge()
    result = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
    result["out"] = str(out)
    if job.into_base is not None:
        result["into_base"] = str(merge_into_base(out, job.into_base, job.base_model))
    return result
