"""Model names: a built-in model (`BUILTIN_MODELS`: `tiny`, `tiny-random`, `gemma-3-270m`,
`gemma-3-270m-sft`), built on first use and cached under rlphf_home(); a `.gguf` file, converted
once into a folder there; anything else is a local folder or a hub name."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rlphf_cli.models.cache import rlphf_home  # noqa: F401 (where every built-in model is cached)
from rlphf_cli.models.gguf import is_gguf
from rlphf_cli.registry import Registry

TINY = "tiny"
TINY_RANDOM = "tiny-random"
GEMMA_270M = "gemma-3-270m"
GEMMA_270M_SFT = "gemma-3-270m-sft"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str  # what building it does, for plans and help
    ensure: Callable[[], Path]  # the cached folder, built first if missing
    random_weights: bool = False  # results of a run on it mean nothing
    # torch threads for a run on it (None: torch's default). A hidden-32 model's ops are far too
    # small to split: with 2 threads OpenMP's fork/join costs more than the op (a fused AdamW step
    # 0.16 s instead of 0.1 ms on a busy 2-core machine), and `rlphf run smoke` takes 25 s instead of 11 s.
    threads: int | None = None


def _ensure_tiny() -> Path:
    from rlphf_cli.models.tiny import ensure_tiny_model, is_built, tiny_model_dir
    from rlphf_cli.progress import LineProgress

    if is_built(tiny_model_dir()):
        return ensure_tiny_model()
    # A first use builds it (minutes on a CPU) inside another command: say so, and how far it is.
    return ensure_tiny_model(progress=LineProgress("building the tiny model (first use, then cached)"))


def _ensure_tiny_random() -> Path:
    from rlphf_cli.models.tiny_random import ensure_tiny_random_model

    return ensure_tiny_random_model()


def _ensure_gemma_270m() -> Path:
    from rlphf_cli.models.gguf import ensure_gemma_270m

    return ensure_gemma_270m()


def _ensure_gemma_270m_sft() -> Path:
    from rlphf_cli.models.sft import ensure_sft_model
    from rlphf_cli.progress import LineProgress

    base = _ensure_gemma_270m()
    return ensure_sft_model(base, GEMMA_270M_SFT,
                            progress=LineProgress("instruction-tuning gemma-3-270m (first use, then cached)"))


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("built-in model")
for _model in (
    BuiltinModel(TINY, "the embedded tiny instruction model (SFT on the shipped corpus, 2-3 min on 2 cores)",
                 _ensure_tiny),
    BuiltinModel(TINY_RANDOM, "a small Llama with random weights for smoke runs (about a second)",
                 _ensure_tiny_random, random_weights=True, threads=1),
    BuiltinModel(GEMMA_270M, "Google's Gemma 3 270M base model from the optional extra 'gemma' (Gemma Terms of Use), "
                 "converted once from its GGUF file (a few minutes on 2 cores)", _ensure_gemma_270m),
    BuiltinModel(GEMMA_270M_SFT, "gemma-3-270m instruction-tuned with LoRA on the shipped corpus so that it ends its "
                 "answers, merged and cached (about 6 minutes on 2 cores after the conversion)", _ensure_gemma_270m_sft),
):
    BUILTIN_MODELS.register(_model.name)(_model)


def builtin_model(name: str) -> BuiltinModel | None:
    return BUILTIN_MODELS.get(name) if name in BUILTIN_MODELS else None


def resolve_model(name: str) -> str:
    """A built-in name -> its cached folder (built if missing); a `.gguf` file -> its converted folder
    (converted if missing); other names pass through unchanged so `from_pretrained(name)` loads a
    local folder or a hub model."""
    model = builtin_model(name)
    if model is not None:
        return str(model.ensure())
    if is_gguf(name):
        from rlphf_cli.models.gguf import ensure_gguf_model

        return str(ensure_gguf_model(name))
    return name


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: unchanged) inside the block."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
