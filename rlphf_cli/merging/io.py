"""Reading and checking PEFT LoRA adapter folders, and writing the merged one.

Only `adapter_config.json` and `adapter_model.safetensors` are read; a pickled `adapter_model.bin`
is refused. Everything here runs before the first byte of output is written, so a bad input
leaves nothing behind. torch and safetensors are imported inside functions (the recipe imports
this package to check `merge.method`, and `rlphf --help` must not load torch).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError
from rlphf_cli.runs import file_sha256

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CARD_FILE = "soup.json"
# Copied from the first input so a soup folder is as self-contained as a policy folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

# PEFT's saved key names: '<prefix>.<module>.lora_A.weight' for Linear/Conv layers and
# '<prefix>.<module>.lora_embedding_A' for Embedding layers (adapter name already stripped).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<lin>[AB])\.weight|lora_embedding_(?P<emb>[AB]))$")
# Saved keys start with 'base_model.model.'; PEFT's rank/alpha patterns match the rest.
_SAVED_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    """One adapted layer: the keys of its A (r x in) and B (out x r) factors."""

    name: str
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.a_shape[0]


@dataclass
class AdapterInput:
    """A checked adapter folder: its config and the names/shapes of its tensors (no data loaded)."""

    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)  # modules_to_save etc.: key -> shape
    dtypes: dict[str, str] = field(default_factory=dict)  # key -> safetensors dtype ('F32', 'BF16', ...)
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def scale(self, module: str) -> float:
        """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), patterns applied."""
        lora = self.modules[module]
        name = module.removeprefix(_SAVED_PREFIX)
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, name, self.config["lora_alpha"])
        r = lora.rank
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern_value(pattern: dict, module: str, default):
    # The rule of peft.utils.other.get_pattern_key: a pattern key matches a suffix of the module name.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def read_adapter(path: str | Path) -> AdapterInput:
    """Check one adapter folder and read its config and tensor index (not the tensors)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in (WEIGHTS_FILE, CONFIG_FILE, *PICKLE_FILES):
        folder = folder.parent
    if not folder.exists():
        raise InputError(f"{path}: adapter folder not found")
    if not folder.is_dir():
        raise InputError(f"{path}: not an adapter folder (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{config_path}: file not found (not a PEFT adapter folder)")
    config = files.read_json_object(config_path, "adapter config")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{config_path}: a {kind or 'non-PEFT'} adapter; only LoRA adapters can be merged")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise InputError(f"{config_path}: '{key}' must be a positive number, got {config.get(key)!r}")

    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = next((folder / name for name in PICKLE_FILES if (folder / name).is_file()), None)
        if pickled is not None:
            raise InputError(
                f"{pickled}: pickle weights are not read (unsafe); convert the adapter to safetensors first, "
                f"e.g. PeftModel.from_pretrained(base, '{folder}').save_pretrained(DIR, safe_serialization=True)"
            )
        raise InputError(f"{weights_path}: file not found")

    adapter = AdapterInput(path=folder, config=config)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            adapter.dtypes = {key: handle.get_slice(key).get_dtype() for key in shapes}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{weights_path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    _index_tensors(adapter, shapes, weights_path)
    return adapter


def hash_inputs(inputs: list[AdapterInput]) -> None:
    """sha256 of every input file, for the card (run in a thread while the merge computes)."""
    for adapter in inputs:
        adapter.sha256 = {name: file_sha256(adapter.path / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}


def _index_tensors(adapter: AdapterInput, shapes: dict[str, tuple[int, ...]], weights_path: Path) -> None:
    factors: dict[str, dict[str, str]] = {}
    for key in sorted(shapes):
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["lin"] or match["emb"]] = key
        else:
            adapter.full[key] = shapes[key]
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise InputError(f"{weights_path}: module {module} has no lora_{missing} tensor")
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1]:
            raise InputError(f"{weights_path}: module {module}: lora_A {_shape_text(a_shape)} and lora_B "
                             f"{_shape_text(b_shape)} do not share a rank")
        adapter.modules[module] = LoraModule(module, pair["A"], pair["B"], a_shape, b_shape)
    if not adapter.modules:
        raise InputError(f"{weights_path}: no LoRA tensors (lora_A/lora_B) found")


# --------------------------------------------------------------------------------------------
# Checks across inputs


def _norm_base(name: str | None) -> str | None:
    return name.rstrip("/") if isinstance(name, str) else name


def _targets(config: dict):
    targets = config.get("target_modules")
    return sorted(targets) if isinstance(targets, list) else targets


def check_compatible(inputs: list[AdapterInput], *, same_rank: bool, same_scale: bool, factor_methods: bool,
                     method: str, force: bool = False) -> None:
    """Same base model (unless force), task, target modules, tensors and shapes.

    same_rank: every module has the same rank in every input (average, ties, dare).
    same_scale: r, lora_alpha, rsLoRA and patterns equal (average keeps the inputs' scaling).
    factor_methods: methods other than average read A and B as a low-rank update, which DoRA
    magnitudes and LoRA biases are not.
    """
    first = inputs[0]
    for other in inputs[1:]:
        where = f"{other.path} vs {first.path}"
        if not force and _norm_base(other.base_model) != _norm_base(first.base_model):
            raise InputError(f"{where}: different base models ({other.base_model!r} vs {first.base_model!r}); "
                             "merge adapters of one base model, or pass --force if they are the same model")
        if other.config.get("task_type") != first.config.get("task_type"):
            raise InputError(f"{where}: different task types ({other.config.get('task_type')} vs "
                             f"{first.config.get('task_type')})")
        if _targets(other.config) != _targets(first.config):
            raise InputError(f"{where}: different target modules ({_targets(other.config)} vs {_targets(first.config)})")
        if set(other.modules) != set(first.modules):
            extra = sorted(set(other.modules) ^ set(first.modules))[0]
            raise InputError(f"{where}: different adapted layers (e.g. {extra.removeprefix(_SAVED_PREFIX)})")
        if set(other.full) != set(first.full):
            extra = sorted(set(other.full) ^ set(first.full))[0]
            raise InputError(f"{where}: different saved tensors (e.g. {extra})")
        for name, mod in other.modules.items():
            ref = first.modules[name]
            short = name.removeprefix(_SAVED_PREFIX)
            if mod.a_shape[1:] != ref.a_shape[1:] or mod.b_shape[:1] + mod.b_shape[2:] != ref.b_shape[:1] + ref.b_shape[2:]:
                raise InputError(f"{where}: incompatible shapes at {short} (lora_B x lora_A: "
                                 f"{_shape_text(mod.b_shape)} x {_shape_text(mod.a_shape)} vs "
                                 f"{_shape_text(ref.b_shape)} x {_shape_text(ref.a_shape)})")
            if same_rank and mod.rank != ref.rank:
                hint = "; use --merge-method exact (or svd) to merge different ranks" if method == "average" else ""
                raise InputError(f"{where}: method '{method}' needs equal ranks, got r={mod.rank} vs r={ref.rank} "
                                 f"at {short}{hint}")
        for key, shape in other.full.items():
            if shape != first.full[key]:
                raise InputError(f"{where}: incompatible shapes at {key} ({_shape_text(shape)} vs "
                                 f"{_shape_text(first.full[key])})")
        if same_scale:
            for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
                mine, theirs = other.config.get(key) or None, first.config.get(key) or None
                if mine != theirs:
                    raise InputError(f"{where}: different {key} ({mine} vs {theirs}); method '{method}' averages A "
                                     "and B separately, which only makes sense at one scaling; "
                                     "use --merge-method exact to merge adapters with different alpha/r")
    if factor_methods:
        for adapter in inputs:
            for key in ("use_dora", "lora_bias"):
                if adapter.config.get(key):
                    raise InputError(f"{adapter.path}: {key} adapters can be merged with --merge-method average only")


def check_out_dir(out_dir: str | Path, inputs: list[AdapterInput]) -> Path:
    """Refuse to replace an input or a folder that is not an earlier soup (the write replaces it whole)."""
    out = Path(out_dir).expanduser()
    resolved = out.resolve()
    for adapter in inputs:
        if resolved == adapter.path.resolve():
            raise InputError(f"{out}: the output folder is one of the inputs; choose another --out")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not (out / CARD_FILE).is_file():
            raise InputError(f"{out}: exists and is not a soup folder (no {CARD_FILE}); "
                             "choose another --out or remove it")
    return out


# --------------------------------------------------------------------------------------------
# Writing


def output_config(first: AdapterInput, module_ranks: dict[str, int] | None) -> dict:
    """The merged adapter's config: the first input's, with rank/alpha reset when the method folded
    the scales into the factors (alpha = r, so PEFT's and vLLM's scaling is 1).

    Only LoraConfig fields are written: merge metadata lives in soup.json.
    """
    config = dict(first.config)
    if module_ranks is None:
        return config
    counts: dict[int, int] = {}
    for r in module_ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(name.removeprefix(_SAVED_PREFIX)): rank for name, rank in module_ranks.items() if rank != r}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    return config


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsWriter:
    """Write a .safetensors file one tensor at a time, so the merged adapter never sits whole in memory.

    The header (names, dtypes, shapes, offsets) is written first, from shapes known in advance;
    each tensor's bytes then go straight from its memory to the file, in header order. When the
    dtypes have different sizes, later tensors could be misaligned for zero-copy loading, so the
    tensors are collected and written by safetensors' own save_file instead.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        import struct

        self.path, self.entries, self.metadata = path, entries, metadata
        self._next = 0
        self._collected: dict | None = None
        self._file = None
        if len({_ITEMSIZE.get(dtype, 0) for _, dtype, _ in entries}) > 1 or any(d not in _ITEMSIZE for _, d, _ in entries):
            self._collected = {}
            return
        header: dict = {"__metadata__": metadata}
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * _ITEMSIZE[dtype]
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, key: str, tensor) -> None:
        import torch

        expected, dtype, shape = self.entries[self._next]
        if key != expected or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"safetensors writer: got {key} {tuple(tensor.shape)}, expected {expected} {shape}")
        self._next += 1
        tensor = tensor.to(torch_dtype(dtype)).contiguous()
        if self._collected is not None:
            self._collected[key] = tensor
        elif tensor.numel():
            self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        if self._collected is not None:
            from safetensors.torch import save_file

            save_file(self._collected, str(self.path), metadata=self.metadata)
        self.release()
        if self._next != len(self.entries):
            raise RuntimeError(f"safetensors writer: {len(self.entries) - self._next} tensors were not written")


    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def torch_dtype(name: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}.get(name) or getattr(torch, {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}[name])
