"""soup.json, the merge card: what went in, with which weights, by which formula."""

from __future__ import annotations

import time

from rlphf_cli import __version__
from rlphf_cli.merging.io import AdapterInput
from rlphf_cli.merging.methods import MergeMethod


def build_card(method: MergeMethod, inputs: list[AdapterInput], weights: list[float], used: list[float],
               config: dict, n_full: int, seconds: float, extra: dict | None = None) -> dict:
    card = {
        "rlphf_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": method.name,
        "formula": method.formula,
        "parameters": method.parameters(),
        "weights": list(weights),
        "weights_used": list(used),
        "inputs": [
            {
                "path": str(adapter.path),
                "r": adapter.config.get("r"),
                "lora_alpha": adapter.config.get("lora_alpha"),
                "use_rslora": bool(adapter.config.get("use_rslora")),
                "base_model_name_or_path": adapter.base_model,
                "sha256": adapter.sha256,
            }
            for adapter in inputs
        ],
        "output": {
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "lora_modules": len(inputs[0].modules),
            "full_tensors": n_full,
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "task_type": config.get("task_type"),
        },
        "full_tensors_rule": "tensors that are not LoRA factors (modules_to_save, saved embeddings) get the weights "
                             "the LoRA update uses (weights_used), which must sum to 1; identical ones are copied",
        "seconds": round(seconds, 4),
    }
    if method.stats:
        card["stats"] = method.stats
    if extra:
        card.update(extra)
    return card
