"""Seeded sampling, one definition for `rlphf generate` and `rlphf serve`.

A row (one response to one prompt) draws its tokens from its own random stream: the seed comes
from the sampling seed, the sample index and the prompt text, never from the batch, and step k
uses the k-th uniform of that stream. Temperature, top-k and top-p are transformers' own warpers;
the draw is inverse-CDF sampling over the warped distribution in float64. So a seeded answer does
not depend on the rows decoded beside it, and the server's seeded answers equal `rlphf generate`'s
for the same soup, prompt and settings. torch is imported inside functions.
"""

from __future__ import annotations

import hashlib


def row_seed(seed: int, sample: int, text: str, attempt: int = 0) -> int:
    """The seed of one response: the sampling seed, the sample index, the resampling attempt and
    the prompt text (as rendered for the model)."""
    key = f"{seed}\0{sample}\0{attempt}\0{text}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def uniforms(seed: int, count: int):
    """The row's uniforms, one per decoding step (the first k do not depend on `count`)."""
    import torch

    return torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def warpers(temperature: float, top_k: int = 0, top_p: float = 1.0) -> list:
    """transformers' temperature, top-k and top-p warpers, in the order `generate` applies them."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def draw(scores, u):
    """Inverse-CDF draw of one token per row of `scores` (warped logits) with uniforms `u` (one per row)."""
    import torch

    cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # Rounding can put u at the very top: take the last token with any probability.
    last = (cdf < cdf[:, -1:]).sum(-1)
    return torch.minimum(tokens, last)
