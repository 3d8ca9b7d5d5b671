"""Personalized soups: merge per-preference LoRA adapters from their files alone.

    merge_adapters(adapter_dirs, weights, method="average", out_dir=DIR, *, force=False, **params) -> Path
    merge_in_memory(adapters, tensors, weights, method="average", **params) -> (state dict, config)

Both go through merged_tensors, so a soup served from memory (`rlphf serve`) is the same tensors
as the file `rlphf merge` writes.

Methods (registered by name in METHODS; formulas in rlphf_cli.merging.methods and in each soup's
soup.json): average (the paper's, default), exact, svd, ties, dare. The base model is never loaded
(except by merge_into_base). Importing this package does not import torch.
"""

from rlphf_cli.merging.methods import METHODS, PARAMETERS, MergeMethod
from rlphf_cli.merging.soup import (
    MergePlan,
    merge_adapters,
    merge_from_recipe,
    merge_in_memory,
    merge_into_base,
    merged_tensors,
    parse_weights,
    plan_merge,
)

__all__ = ["METHODS", "PARAMETERS", "MergeMethod", "MergePlan", "merge_adapters", "merge_from_recipe",
           "merge_in_memory", "merge_into_base", "merged_tensors", "parse_weights", "plan_merge"]
