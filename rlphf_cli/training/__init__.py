"""Training with TRL + PEFT: LoRA reward models (`reward`) and LoRA policies (`policy`).

Heavy libraries (torch, transformers, trl, peft, datasets) are imported inside functions so that
importing this package stays cheap.
"""

from __future__ import annotations

import os

# The name of the preference-agnostic reward model of the traditional RLHF baseline:
# annotations/general.jsonl -> rm/general -> policy/rlhf.
GENERAL = "general"


def is_main_process() -> bool:
    """True outside distributed launches and on rank 0 inside them (no torch import needed)."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """The number of processes of a distributed launch (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def quiet_libraries() -> None:
    """For the CLI: no transformers progress bars or info logs, no deprecation chatter from the stack
    (our own progress bar and one-line errors are what the user reads)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|trl|peft|accelerate)\b")
