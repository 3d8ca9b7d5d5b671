"""Merge methods, one LoRA module at a time.

Notation, per adapted layer: input i has factors A_i (r_i x in), B_i (out x r_i), PEFT scaling
s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA), so its update is s_i B_i A_i. w_i are
the user's weights. Every method returns the merged (A, B); methods other than `average` fold
the scaling into the factors and the output config sets lora_alpha = r (scaling 1).

Members whose weight is 0 are dropped before any method runs (rlphf_cli.merging.soup.plan_merge),
so weights (1, 0) give input 1 back under every method.

Weights: `average`, `ties` and `dare` normalize the weights to sum to 1 (a weighted mean), so n
identical inputs give the input back at any weights; `exact` and `svd` use them as given (the
update is sum_i w_i s_i B_i A_i, so weights may be negative or sum to more than 1).

Tensors that are not LoRA factors (modules_to_save such as a reward model's score head, saved
embeddings) are full weights, not updates: they get the same weights as the LoRA update,
sum_i w_i T_i (`merge_full`). Under `exact`/`svd` that equals base + sum_i w_i (T_i - base) only
when the weights sum to 1, and the base is never loaded, so other sums are refused there unless
the tensors are identical (identical tensors are copied unchanged under every method).

torch is imported inside functions: the recipe imports this module to check `merge.method`.
"""

from __future__ import annotations

import abc
import math
import zlib
from collections.abc import Mapping
from typing import Any

from rlphf_cli.errors import InputError
from rlphf_cli.registry import Registry
from rlphf_cli.specs import MergeSpec

METHODS: Registry[type[MergeMethod]] = Registry("merge method")

# Every parameter any method takes; callers may pass them all (e.g. from the recipe), and each
# method keeps the ones it uses.
PARAMETERS = ("rank", "density", "seed")

LOGITS_NOT_A_MERGE = ("compose 'logits' mixes the experts' next-token predictions while decoding: there is no "
                      "adapter to merge; use it with rlphf generate or rlphf serve (--compose logits)")


def merge_spec(method: str, values: Mapping[str, Any] | None = None) -> MergeSpec:
    """The method and the parameters it declares, taken from `values` (unset ones and those of other
    methods left out), checked now by building the method: the one reader of merge settings."""
    values = values or {}
    if method == "logits":
        raise InputError(LOGITS_NOT_A_MERGE)
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        raise InputError(f"unknown merge parameter '{unknown[0]}' (parameters: {', '.join(PARAMETERS)})")
    declared = METHODS.get(method).params
    spec = MergeSpec(method, tuple((k, values[k]) for k in declared if values.get(k) is not None))
    merger(spec)
    return spec


def merger(spec: MergeSpec) -> MergeMethod:
    """A fresh instance of the spec's method (an instance keeps one merge's statistics)."""
    return METHODS.get(spec.method)(**spec.kwargs())


class MergeMethod(abc.ABC):
    """Base class: subclasses set the class attributes and implement `merge_module`."""

    name = ""
    formula = ""
    params: tuple[str, ...] = ()  # the PARAMETERS this method uses
    negative_weights = False  # may a weight be < 0 (preference subtraction)?
    same_rank = True  # must every input have the same rank per module?
    same_scale = False  # must every input have the same r / alpha (the output keeps them)?
    folds_scale = True  # output lora_alpha = r, the scalings are inside the factors

    def __init__(self, **params):
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise InputError(f"unknown merge parameter '{unknown[0]}' (parameters: {', '.join(PARAMETERS)})")
        self.values = {k: params[k] for k in self.params if params.get(k) is not None}
        self.stats: dict = {}

    def parameters(self) -> dict:
        """The parameters that shaped the result, for the merge card."""
        return dict(self.values)

    def check_weights(self, weights: list[float]) -> list[float]:
        """Validate the user's weights; return the ones the formula uses."""
        if not self.negative_weights:
            for w in weights:
                if w < 0:
                    raise InputError(f"negative weight {w:g}: method '{self.name}' needs weights >= 0; "
                                     "negative weights (preference subtraction) work with --merge-method exact or svd")
        return list(weights)

    def prepare(self, inputs: list) -> None:  # noqa: B027 (an optional hook)
        """Called with the checked inputs (rlphf_cli.merging.io.AdapterInput) before the first module."""

    def output_rank(self, ranks: list[int]) -> int:
        """The merged rank of a module whose inputs have these ranks."""
        return ranks[0]

    @abc.abstractmethod
    def merge_module(self, module: str, As: list, Bs: list, scales: list[float], weights: list[float]):
        """The merged (A, B) of one module, in the dtype of the first input's tensors."""

    def finish(self) -> None:  # noqa: B027 (an optional hook)
        """Called after the last module (summary statistics for the card)."""


def _compute_dtype(dtype):
    import torch

    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def weighted_sum(tensors: list, weights: list[float]):
    """sum_i w_i T_i, accumulated in float32 for half-precision inputs, returned in the input dtype."""
    dtype = tensors[0].dtype
    acc = tensors[0].to(_compute_dtype(dtype)) * weights[0]
    for tensor, w in zip(tensors[1:], weights[1:], strict=True):
        acc.add_(tensor.to(acc.dtype), alpha=w)
    return acc.to(dtype)


def paper_average(tensors: list):
    """The paper's evaluation code, operation for operation: (T_1 + T_2 + ... + T_n) / n in the
    tensors' dtype (joeljang/RLPHF generate_rollouts.py, `param_sum += params; param_sum / n`)."""
    acc = tensors[0].clone()
    for tensor in tensors[1:]:
        acc += tensor
    return acc / len(tensors)


def merge_full(tensors: list, weights: list[float]):
    """A non-LoRA tensor (modules_to_save, saved embeddings): sum_i w_i T_i with the weights the
    method's LoRA update uses. Identical tensors are copied unchanged; uniform weights reproduce the
    paper's average bit for bit."""
    import torch

    if all(torch.equal(tensors[0], t) for t in tensors[1:]):
        return tensors[0]
    total = sum(weights)
    if abs(total - 1) > 1e-6:
        raise InputError(f"the weights sum to {total:g}: tensors that are not LoRA factors (e.g. a reward model's "
                         "score head) are full weights and can only be combined with weights summing to 1 "
                         "without the base model; rescale the weights")
    if len(set(weights)) == 1:
        return paper_average(tensors)
    return weighted_sum(tensors, weights)


def normalized(weights: list[float], method: str) -> list[float]:
    """Weights scaled to sum to 1, for the methods that take a weighted mean."""
    total = sum(weights)
    if total <= 0:
        raise InputError(f"the weights sum to {total:g}: method '{method}' needs at least one positive weight")
    return [w / total for w in weights]


def _as_matrix(tensor):
    """A factor as a 2-D matrix: A (r, in, ...) -> (r, in*...); B (out, r, 1, 1) -> (out, r)."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() != 2 else tensor


@METHODS.register("average")
class Average(MergeMethod):
    """The paper's soup: a weighted average of every LoRA tensor, A and B separately.

        A = sum_i w_i A_i,   B = sum_i w_i B_i,   weights normalized to sum to 1,
        update = s * B A = s * (sum_i w_i B_i)(sum_j w_j A_j)   (not sum_i w_i s B_i A_i)

    With uniform weights it is computed as (A_1 + ... + A_n) / n, bit-for-bit what the paper's
    evaluation code did. All inputs must share r and lora_alpha (the output keeps them).
    peft's add_weighted_adapter(combination_type="linear") differs: it uses sqrt(w_i s_i) on each
    factor and sets alpha = r, so for weights (0.5, 0.5) its update is 2x this one.
    """

    name = "average"
    formula = ("A = sum_i w_i A_i; B = sum_i w_i B_i (w normalized to sum 1; uniform w: (A_1+...+A_n)/n, "
               "the paper's code); update = s B A with the inputs' common scaling s = alpha/r")
    same_scale = True
    folds_scale = False

    def check_weights(self, weights):
        weights = super().check_weights(weights)
        self.uniform = len(set(weights)) == 1
        return normalized(weights, self.name)

    def merge_module(self, module, As, Bs, scales, weights):
        if self.uniform:
            return paper_average(As), paper_average(Bs)
        return weighted_sum(As, weights), weighted_sum(Bs, weights)


@METHODS.register("exact")
class Exact(MergeMethod):
    """Rank concatenation: the update is exactly the weighted sum of the inputs' updates.

        A = [w_1 s_1 A_1; ...; w_n s_n A_n] (rows),   B = [B_1, ..., B_n] (columns),
        r = sum_i r_i, lora_alpha = r,   update = B A = sum_i w_i s_i B_i A_i

    Same as peft's add_weighted_adapter(combination_type="cat"). Ranks and alphas may differ;
    negative weights subtract a preference. The output rank grows with the number of inputs.
    """

    name = "exact"
    formula = "A = concat_rows(w_i s_i A_i); B = concat_cols(B_i); r = sum_i r_i; alpha = r; update = sum_i w_i s_i B_i A_i"
    negative_weights = True
    same_rank = False

    def output_rank(self, ranks):
        return sum(ranks)

    def merge_module(self, module, As, Bs, scales, weights):
        import torch

        A = torch.cat([a * (w * s) for a, w, s in zip(As, weights, scales, strict=True)], dim=0)
        B = torch.cat(Bs, dim=1)
        return A, B


@METHODS.register("svd")
class SVD(MergeMethod):
    """The exact update truncated to rank r, the best rank-r approximation in Frobenius norm.

        U = B_c A_c with B_c = [B_1, ..., B_n], A_c = [w_1 s_1 A_1; ...; w_n s_n A_n]  (R = sum r_i)
        B_c = Q_B R_B, A_c^T = Q_A R_A  (thin QR),   R_B R_A^T = P S V^T  (SVD of an R x R core)
        B = Q_B P_r S_r^(1/2),   A = S_r^(1/2) V_r^T Q_A^T,   lora_alpha = r

    The out x in update is never formed: the cost is O((out + in) R^2), against peft's
    add_weighted_adapter(combination_type="svd"), which builds the dense update and takes its full
    SVD. The singular values are those of the exact update, so the truncation error
    sqrt(sum_{k>r} S_k^2) is the optimal one (Eckart-Young). --rank defaults to the largest input
    rank; the soup card records the relative truncation error. Computed in float64.
    """

    name = "svd"
    formula = ("update = sum_i w_i s_i B_i A_i truncated to rank r via QR of the stacked factors and SVD of the "
               "R x R core (R = sum_i r_i); B = Q_B P_r S_r^1/2, A = S_r^1/2 V_r^T Q_A^T; alpha = r")
    params = ("rank",)
    negative_weights = True
    same_rank = False

    def __init__(self, **params):
        super().__init__(**params)
        rank = self.values.get("rank")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise InputError(f"--rank must be a positive integer, got {rank!r}")
        self._errors: list[float] = []

    def prepare(self, inputs):
        self.values.setdefault("rank", max(m.rank for a in inputs for m in a.modules.values()))

    def output_rank(self, ranks):
        return self.values["rank"]

    def merge_module(self, module, As, Bs, scales, weights):
        import torch

        a_shape, b_shape, dtype = As[0].shape, Bs[0].shape, As[0].dtype
        rank = self.values["rank"]
        b_cat = torch.cat([_as_matrix(b).double() for b in Bs], dim=1)
        a_cat = torch.cat([_as_matrix(a).double() * (w * s) for a, w, s in zip(As, weights, scales, strict=True)], dim=0)
        q_b, r_b = torch.linalg.qr(b_cat)
        q_a, r_a = torch.linalg.qr(a_cat.T)
        p, sv, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        k = min(rank, sv.numel())
        root = sv[:k].sqrt()
        B = (q_b @ p[:, :k]) * root
        A = root[:, None] * (vh[:k] @ q_a.T)
        total = float(sv.square().sum())
        self._errors.append(math.sqrt(float(sv[k:].square().sum()) / total) if total > 0 else 0.0)
        if k < rank:  # fewer singular values than the rank asked: pad so every module has rank r
            A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = A.reshape(rank, *a_shape[1:]).to(dtype)
        B = B.reshape(b_shape[0], rank, *b_shape[2:]).to(dtype)
        return A, B

    def finish(self):
        if self._errors:
            self.stats = {"relative_truncation_error_max": max(self._errors),
                          "relative_truncation_error_mean": sum(self._errors) / len(self._errors)}


def _factor_scales(scales):
    """Each input's scaling, folded into both of its factors: sqrt(s_i) on A and on B."""
    return [math.sqrt(s) for s in scales]


def _check_density(values: dict, name: str) -> float:
    density = values.get("density")
    if density is None:
        raise InputError(f"method '{name}' needs a density, the fraction of entries kept: --density 0.5 in rlphf merge, "
                         "--set merge.density=0.5 elsewhere")
    if not 0 < density <= 1:
        raise InputError(f"--density must be in (0, 1], got {density:g}")
    return float(density)


@METHODS.register("ties")
class Ties(MergeMethod):
    """TIES-merging (Yadav et al. 2023) applied to each factor separately, as peft's
    add_weighted_adapter(combination_type="ties") does (not to the dense update), with a weighted
    disjoint mean so that the result is on the scale of the inputs.

        weights normalized to sum 1; for X in (A, B), with the scaling folded in, sqrt(s_i) X_i:
          trim:  T_i = sqrt(s_i) X_i keeping its top `density` fraction of entries by magnitude
          elect: g = sign(sum_i w_i T_i)  (+1 where the sum is 0): the weights vote, so a member
                 at weight 0.1 cannot overturn one at 0.9 (the plain sum of TIES' paper would)
          merge: X = sum_i [sign(T_i) == g] w_i T_i / sum_i [sign(T_i) == g] w_i
        lora_alpha = r

    n identical inputs give the input back (at density 1) at any weights. With uniform weights it
    equals peft's ties at weights 1 (peft's weights multiply the disjoint mean, so at the weights
    1/n of a soup peft returns 1/n of the update). Deterministic. Equal ranks required.
    """

    name = "ties"
    formula = ("w normalized to sum 1; per factor X in {A, B}: T_i = top-density(|sqrt(s_i) X_i|) of sqrt(s_i) X_i; "
               "g = sign(sum_i w_i T_i); X = sum_i [sign T_i = g] w_i T_i / sum_i [sign T_i = g] w_i; alpha = r")
    params = ("density",)
    same_rank = True

    def __init__(self, **params):
        super().__init__(**params)
        self.density = _check_density(self.values, self.name)

    def check_weights(self, weights):
        return normalized(super().check_weights(weights), self.name)

    def _ties(self, tensors, scales, weights):
        import torch

        dtype = tensors[0].dtype
        trimmed = []
        for t, scale in zip(tensors, scales, strict=True):
            t = t.to(_compute_dtype(dtype)) * scale
            if self.density < 1:
                k = int(self.density * t.numel())
                mask = torch.zeros(t.numel(), dtype=t.dtype)
                mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
                t = t * mask.reshape(t.shape)
            trimmed.append(t)
        stacked = torch.stack(trimmed)
        w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
        elected = torch.where((stacked * w).sum(dim=0) >= 0, 1, -1)
        agree = (stacked.sign() == elected).to(stacked.dtype)
        total = (agree * w).sum(dim=0)
        merged = (stacked * agree * w).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
        return merged.to(dtype)

    def merge_module(self, module, As, Bs, scales, weights):
        roots = _factor_scales(scales)
        return self._ties(As, roots, weights), self._ties(Bs, roots, weights)


@METHODS.register("dare")
class Dare(MergeMethod):
    """DARE (Yu et al. 2024, "drop and rescale") + a weighted mean on each factor, as peft's
    add_weighted_adapter(combination_type="dare_linear") does (not on the dense update).

        weights normalized to sum 1; for X in (A, B), with the scaling folded in, sqrt(s_i) X_i:
          M_i ~ Bernoulli(density) elementwise,   X = sum_i w_i sqrt(s_i) (M_i * X_i) / density
        lora_alpha = r

    n identical inputs give the input back (at density 1; in expectation below it) at any weights.
    peft's dare_linear puts sqrt(w_i) on each factor, so at the weights 1/n of a soup it returns
    n times the update; it equals this at weights w_i^2. Seeded and reproducible: the mask of
    (module, factor, input i) comes from its own generator, seeded with crc32("seed:module:factor:i"),
    so it does not depend on processing order.
    """

    name = "dare"
    formula = ("w normalized to sum 1; per factor X in {A, B}: X = sum_i w_i sqrt(s_i) (M_i * X_i) / density, "
               "M_i ~ Bernoulli(density) seeded by (seed, module, factor, i); alpha = r")
    params = ("density", "seed")
    same_rank = True

    def __init__(self, **params):
        super().__init__(**params)
        self.density = _check_density(self.values, self.name)
        self.values.setdefault("seed", 0)

    def check_weights(self, weights):
        return normalized(super().check_weights(weights), self.name)

    def _dare(self, module, factor, tensors, weights):
        import torch

        dtype = tensors[0].dtype
        out = None
        for i, (t, v) in enumerate(zip(tensors, weights, strict=True)):
            t = t.to(_compute_dtype(dtype))
            if self.density < 1:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{self.values['seed']}:{module}:{factor}:{i}".encode()))
                t = t * torch.bernoulli(torch.full_like(t, self.density), generator=gen) / self.density
            out = t * v if out is None else out.add_(t, alpha=v)
        return out.to(dtype)

    def merge_module(self, module, As, Bs, scales, weights):
        per_factor = [w * root for w, root in zip(weights, _factor_scales(scales), strict=True)]
        return self._dare(module, "A", As, per_factor), self._dare(module, "B", Bs, per_factor)
