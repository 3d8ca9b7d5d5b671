"""Personalized soups: merge per-preference LoRA adapters from their files alone.

    merge_adapters(adapter_dirs, weights, method="average", out_dir=DIR, *, force=False, **params) -> Path
    merge_in_memory(adapters, tensors, weights, method="average", **params) -> (state dict, config)

`method` is a specs.MergeSpec (what the builders make from a recipe) or a method name with its
parameters.

Both go through merged_tensors, so a soup served from memory (`rlphf serve`) is the same tensors
as the file `rlphf merge` writes.

Methods (registered by name in METHODS; formulas in rlphf_cli.merging.methods and in each soup's
soup.json): average (the paper's, default), exact, svd, ties, dare. The base model is never loaded
(except by merge_into_base). Importing this package does not import torch.
"""

from rlphf_cli.merging.methods import METHODS, PARAMETERS, MergeMethod

_SOUP_NAMES = ("MergePlan", "merge_adapters", "merge_in_memory", "merge_into_base", "merged_tensors", "parse_weights",
               "plan_merge", "run_merge")

__all__ = ["METHODS", "PARAMETERS", "MergeMethod", *_SOUP_NAMES]


def __getattr__(name: str):
    # The recipe checks merge.method against METHODS; making soups (files, run directories, models)
    # loads on first use, so that the recipe depends on the method names alone.
    if name in _SOUP_NAMES:
        from rlphf_cli.merging import soup

        return getattr(soup, name)
    raise AttributeError(f"module 'rlphf_cli.merging' has no attribute '{name}'")
