"""`rlphf run RECIPE --smoke`: the recipe cut down to a run of seconds that checks it works.

The built-in `smoke` recipe (rlphf_cli/recipes/smoke.yaml) supplies the model (`tiny-random`) and
every size (prompts, tokens, steps, batch sizes, bootstrap samples); the recipe keeps what is its
own: preferences (defined ones included), prompt sources, judge templates, LoRA, learning rates,
merge method, baselines. Both judges become `coin`, which renders the recipe's templates but
decides by a hash: recipe-defined preferences have no rubric measure and CI has no LLM endpoint.
The run goes to `<run_dir>-smoke`, never over the recipe's real run. What `--set` or a flag sets
explicitly is kept as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SMOKE_RECIPE = "smoke"
SUFFIX = "-smoke"

# Taken from the smoke recipe: the model and the sizes.
SIZES = ("model.name", "data.max_train_prompts", "data.max_eval_prompts", "generate.max_new_tokens",
         "generate.batch_size", "annotate.num_samples", "judge.bootstrap_samples", "parallel")
# The model's other settings back to their defaults: a hub revision, 4-bit loading or bf16 fit the
# recipe's own model, not tiny-random on a CPU.
MODEL_DEFAULTS = {"model.dtype": "auto", "model.load_in_4bit": False, "model.revision": None,
                  "model.trust_remote_code": False}
# TRL fields taken from the smoke recipe's trainer sections, where it has them (not its learning rates).
TRAINER_SIZES = ("max_steps", "per_device_train_batch_size", "num_generations", "max_completion_length", "max_length")
# TRL fields that size a run or need a GPU: dropped from the recipe's trainer sections, so that the
# smoke recipe's steps and the CPU defaults apply.
DROPPED_TRAINER_FIELDS = ("num_train_epochs", "gradient_accumulation_steps", "generation_batch_size",
                          "steps_per_generation", "bf16", "fp16", "use_vllm")


def _get(data: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def apply_smoke(recipe, explicit: Mapping[str, str]):
    """`recipe` with the smoke recipe's model and sizes and the coin judge; keys in `explicit`
    (set by --set or a flag) stay as they are."""
    from rlphf_cli.judges import COIN
    from rlphf_cli.recipe import _set_path, load_recipe, validate
    from rlphf_cli.specs import TRAINERS

    def is_explicit(key: str) -> bool:  # set by --set or a flag (the recipe knows where each value came from)
        return recipe.origin(key) != recipe.source

    smoke = load_recipe(SMOKE_RECIPE).model_dump(mode="json")
    data = recipe.model_dump(mode="json")
    changes = {key: _get(smoke, key) for key in SIZES}
    changes.update(MODEL_DEFAULTS)
    # Once: a smoke run's own recipe.yaml (which RLPHF_SMOKE may cut again) keeps its name and folder.
    run = str(recipe.resolved_run_dir())
    changes.update({"annotate.judge": COIN, "judge.backend": COIN,
                    "name": recipe.name.removesuffix(SUFFIX) + SUFFIX, "run_dir": run.removesuffix(SUFFIX) + SUFFIX})
    if recipe.evaluation.sweep is not None:
        changes["evaluation.sweep.weights"] = _get(smoke, "evaluation.sweep.weights")
    for loc in (trainer.section for trainer in TRAINERS.values()):
        section = _get(data, loc)
        for field in DROPPED_TRAINER_FIELDS:
            if field in section and not is_explicit(f"{loc}.{field}"):
                del section[field]
        changes.update({f"{loc}.{field}": value for field, value in _get(smoke, loc).items() if field in TRAINER_SIZES})
    for key, value in changes.items():
        if not is_explicit(key):
            _set_path(data, key, value)
    return validate(data, recipe.source, dict(explicit))


def describe(recipe) -> str:
    """One line for `rlphf run --smoke`: what the run is cut down to."""
    policy_steps = getattr(recipe.train_policy, recipe.train_policy.algo).get("max_steps")
    return (f"{recipe.model.name}, {recipe.data.max_train_prompts} training and {recipe.data.max_eval_prompts} "
            f"evaluation prompts, {recipe.generate.max_new_tokens} new tokens, {policy_steps} steps per policy, "
            + (f"judged by {recipe.judge.backend}" if recipe.annotate.judge == recipe.judge.backend
               else f"annotated by {recipe.annotate.judge}, judged by {recipe.judge.backend}"))


def load_smoke_recipe(path=None, sets: list[str] | None = None, overrides: dict[str, Any] | None = None):
    """`load_recipe` with the smoke sizes applied below --set and the flags (`rlphf run --smoke`)."""
    from rlphf_cli.recipe import load_recipe

    return load_recipe(path, sets, overrides, overlay=apply_smoke)
