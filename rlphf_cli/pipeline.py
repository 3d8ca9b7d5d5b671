"""`rlphf run`: the stages of Personalized Soups in order, resumable."""

from __future__ import annotations

from dataclasses import dataclass

from rlphf_cli.preferences import combination_name
from rlphf_cli.recipe import Recipe


@dataclass(frozen=True)
class Stage:
    name: str
    description: str


def plan(recipe: Recipe) -> list[Stage]:
    """The stages a recipe runs, with what each will do, for --dry-run and progress display."""
    prefs = recipe.preference_set()
    ids = ", ".join(p.id for p in prefs)
    combos = prefs.combinations()
    baselines = recipe.evaluation.baselines
    policy_algo = recipe.train_policy.algo
    stages = []
    if recipe.model.name == "tiny":
        stages.append(Stage("tiny-model", "build the embedded tiny model if it is not cached"))
    stages += [
        Stage("rollouts", f"{recipe.annotate.num_samples} samples per training prompt from {recipe.model.name}"),
        Stage("annotate", f"label pairs for {ids} with the '{recipe.annotate.judge}' judge"),
        Stage("train-rm", f"one LoRA reward model (r={recipe.train_rm.lora.r}) per preference: {ids}"),
        Stage("train-policy", f"one LoRA policy (r={recipe.train_policy.lora.r}, {policy_algo}) per preference: {ids}"),
    ]
    trained_baselines = [b for b in baselines if b in ("morl", "rlhf")]
    if trained_baselines:
        stages.append(Stage("baselines", f"train baseline policies: {', '.join(trained_baselines)}"))
    stages += [
        Stage("merge", f"{len(combos)} soups with '{recipe.merge.method}': "
              + ", ".join(combination_name(c) for c in combos)),
        Stage("evaluate", f"generate on the evaluation prompts: psoups + {', '.join(baselines)} "
              f"x {len(combos)} combinations"),
        Stage("judge", f"psoups and baselines against {', '.join(baselines)} with the '{recipe.judge.backend}' judge"),
        Stage("report", "report.md with win-rate tables, reward-model accuracies, curves, sweep and costs"),
    ]
    return stages
