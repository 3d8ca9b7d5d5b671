"""Seeded sampling, one definition for `rlphf generate` and `rlphf serve`.

A row (one response to one prompt) draws its tokens from its own random stream: the seed comes
from the sampling seed, the sample index and the prompt text, never from the batch, and step k
uses the k-th uniform of that stream. Temperature, top-k and top-p follow transformers' warpers;
the draw is inverse-CDF sampling over the warped distribution in float64, in token-id order. So a seeded answer does
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


def draw(scores, u):
    """Inverse-CDF draw of one token per row of `scores` (warped logits) with uniforms `u` (one per row)."""
    import torch

    cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # Rounding can put u at the very top: take the last token with any probability.
    last = (cdf < cdf[:, -1:]).sum(-1)
    return torch.minimum(tokens, last)


# Top-p looks for its nucleus among this many of the most likely tokens first, and widens the search
# only for rows whose nucleus is larger: transformers' warper sorts the whole vocabulary for every
# row and step, which on a 262k-token vocabulary (Gemma 3) cost more than the model's forward.
NUCLEUS_CANDIDATES = 256


def sample(scores, u, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row of `scores` (next-token logits; -inf for forbidden tokens): temperature,
    then top-k, then top-p as transformers' warpers do (a token stays if the probability of the
    tokens above it is below top_p), then `draw` over what is left with the uniforms `u`. The
    nucleus comes from a partial top-k instead of a sort of the vocabulary, so it is the same set of
    tokens except where float rounding decides a tie at its edge."""
    import torch

    logits = scores.float()
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    limit = min(top_k, vocab) if top_k else vocab
    if limit == vocab and top_p >= 1.0:
        return draw(logits, u)
    k = limit if top_p >= 1.0 else min(limit, NUCLEUS_CANDIDATES)
    # top-p normalizes over what top-k left (transformers' warpers run in that order)
    log_total = None if top_k else torch.logsumexp(logits, dim=-1, keepdim=True)
    while True:
        values, ids = logits.topk(k, dim=-1)
        if top_p >= 1.0:
            keep = torch.ones_like(values, dtype=torch.bool)
            break
        if log_total is None:
            log_total = torch.logsumexp(values, dim=-1, keepdim=True)  # k == top_k here
        probs = (values - log_total).exp()
        cumulative = probs.cumsum(-1)
        keep = cumulative - probs < top_p
        if k == limit or bool((cumulative[:, -1] >= top_p).all()):  # every row's nucleus is inside
            break
        k = min(limit, k * 8)
    order = ids.argsort(dim=-1)  # token-id order, as the inverse CDF over the whole vocabulary
    ids = ids.gather(-1, order)
    kept = values.masked_fill(~keep, float("-inf")).gather(-1, order)
    return ids.gather(-1, draw(kept, u).unsqueeze(-1)).squeeze(-1)
