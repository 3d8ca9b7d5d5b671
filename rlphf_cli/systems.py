"""The systems a run compares, by the names used in recipes, generation folders, judgment files
and the report (DESIGN.md, "Training": the paper's six systems). The pipeline and the report both
read these; neither imports the other for them."""

from __future__ import annotations

BASE = "base"  # the base model, no preference prompt (the paper's VB)
PROMPTED = "prompted"  # the base model with the combination's preference prompts (PP)
PSOUPS = "psoups"  # the experts' LoRA parameters merged per combination, prompted (P-Soups)
# The same experts mixed at decoding time (sum_i w_i log p_i, generate.compose logits), prompted
PSOUPS_DECODING = "psoups-decoding"
TRAINED_BASELINES = ("multitask", "morl", "rlhf")  # one policy each: MT, P-MORL, RLHF
EXPERTS = "experts"  # each single-preference policy with its own preference prompt
SWEEP = "sweep"  # soups of two preferences at a series of weights
# The pareto stage's three ways between two preferences: merged soups, decoding-time mixes, prompts alone
PARETO_METHODS = {"pareto-params": "parameter soups", "pareto-logits": "decoding-time mixes",
                  "pareto-prompted": "prompting alone"}
BASE_PLAIN = "plain"  # generations/base/plain.jsonl: the base model's answers, shared by every combination

# The paper's order (its main figure): single-objective baselines first, then the multi-objective ones.
ORDER = (BASE, "rlhf", PROMPTED, "multitask", "morl", PSOUPS_DECODING, PSOUPS)
LABELS = {BASE: "base (VB)", "rlhf": "RLHF", PROMPTED: "prompting (PP)", "multitask": "multitask (MT)",
          "morl": "P-MORL", PSOUPS_DECODING: "P-Soups (decoding)", PSOUPS: "P-Soups"}


def label(system: str) -> str:
    return LABELS.get(system, system)
