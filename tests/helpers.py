"""Small builders the tests share: a judge or a job from a recipe, as the commands make them."""

from __future__ import annotations

from collections.abc import Sequence

from rlphf_cli.jobs import judge_spec
from rlphf_cli.judges import GENERAL_PREFERENCE, get_judge
from rlphf_cli.preferences import Preference
from rlphf_cli.recipe import Recipe, load_recipe


def recipe_with(*sets: str, path=None) -> Recipe:
    """A recipe (the built-in tiny one by default) with `--set` assignments."""
    return load_recipe(path, list(sets))


def judge_for(backend: str = "rubric", recipe: Recipe | None = None, prefs: Sequence[Preference] | None = None,
              cache_path=None):
    """A judge of `backend` set up from `recipe`'s settings for `prefs` (default: the recipe's
    preferences and the general criterion)."""
    recipe = recipe or load_recipe(None)
    prefs = list(recipe.preference_set()) + [GENERAL_PREFERENCE] if prefs is None else list(prefs)
    return get_judge(judge_spec(recipe, backend, prefs), cache_path)


def generator_for(recipe: Recipe, adapter=None, soup=None, merge: bool = True):
    """The recipe's model with an adapter (a folder or a preference's policy) or a soup
    ('concise,friendly' or [(name or folder, weight)]) merged in, as `rlphf generate` loads it."""
    from rlphf_cli import jobs
    from rlphf_cli.generation import Generator, parse_soup

    members = parse_soup(soup) if isinstance(soup, str) else soup
    return Generator.load(jobs.model_spec(recipe), jobs.weights(recipe, adapter, members),
                          sampling=jobs.sampling(recipe), batch_size=recipe.generate.batch_size, merge=merge)


def generate_to(recipe: Recipe, prompts: list[dict], out, *, prefs: str = "", num_samples: int | None = None,
                resume: bool = False, generator=None, progress=None) -> dict:
    """rlphf_cli.generation.generate_file of the base model on in-memory prompts."""
    from rlphf_cli import jobs
    from rlphf_cli.generation import generate_file
    from rlphf_cli.specs import PromptSet

    job = jobs.generate_job(recipe, out, prompts=PromptSet("<in memory>"), num_samples=jobs.sample_count(
        recipe, num_samples)[0], prefs=recipe.preference_set().resolve(prefs) if prefs else [])
    return generate_file(job, prompts=prompts, generator=generator, resume=resume, progress=progress)
