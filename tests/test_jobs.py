"""Job specs (rlphf_cli.jobs, rlphf_cli.specs): built once from a frozen recipe, checked there, and a
pipeline unit's fingerprint is its spec's, so a change of the recipe reruns exactly the units that
read the changed value and what depends on them."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from rlphf_cli.errors import RecipeError
from rlphf_cli.pipeline import Pipeline
from rlphf_cli.recipe import load_recipe
from rlphf_cli.specs import fingerprint, record

CUSTOM = [
    {"id": "P4A", "alias": "formal", "dimension": "register", "prompt": "Answer formally.",
     "criterion": "Which response is more formal?"},
    {"id": "P4B", "alias": "casual", "dimension": "register", "prompt": "Answer casually.",
     "criterion": "Which response is more casual?"},
]
BASE = {
    "name": "fingerprints", "seed": 0, "model": {"name": "tiny-random"},
    "preferences": {"use": ["P1A", "P2A", "P4A", "P4B"], "define": CUSTOM},
    "data": {"train_prompts": "builtin:tiny-train", "eval_prompts": "builtin:tiny-eval", "max_train_prompts": 8,
             "max_eval_prompts": 4},
    "generate": {"max_new_tokens": 8, "batch_size": 8},
    "annotate": {"judge": "coin", "num_samples": 2},
    "train_rm": {"lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, "trl": {"max_steps": 1}},
    "train_policy": {"algo": "rloo", "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                     "rloo": {"max_steps": 1, "num_generations": 2}, "grpo": {"max_steps": 1},
                     "dpo": {"max_steps": 1}, "sft": {"max_steps": 1}},
    "merge": {"method": "average"},
    "judge": {"backend": "coin", "bootstrap_samples": 10},
    "evaluation": {"baselines": ["base", "prompted", "multitask", "morl", "rlhf"],
                   "sweep": {"prefs": ["P4A", "P4B"], "weights": [0.0, 0.5, 1.0]}},
}


def model(key: str) -> bool:
    return key in ("tiny-model", "rollouts") or key.startswith(("train-rm/", "train-policy/", "baselines/",
                                                                "evaluate/"))


def sampling(key: str) -> bool:
    return key == "rollouts" or key.startswith("evaluate/")


def online(key: str) -> bool:  # the policies trained with the recipe's RL algorithm
    return key.startswith("train-policy/") or key in ("baselines/morl", "baselines/rlhf")


def lora(key: str) -> bool:
    return key.startswith(("train-policy/", "baselines/"))


def judging(key: str) -> bool:
    return key.startswith("judge/")


def judges(key: str) -> bool:  # the coin judge annotates and judges: both read its settings and templates
    return key.startswith(("annotate/", "judge/"))


def prompted_with(pref: str):
    """Units whose prompts carry `pref`'s prompt: evaluations of a combination holding it, its
    expert and prompted evaluations, and the baselines trained on prompts carrying preferences."""
    def reads(key: str) -> bool:
        if key in ("baselines/morl", "baselines/multitask"):
            return True
        return key.startswith("evaluate/") and pref in key.split("/")[-1].split("+") and "/sweep/" not in key
    return reads


def nothing(key: str) -> bool:
    return False


# (recipe key, another value, the units that read it). Every leaf of the recipe is covered by a row
# or by SKIPPED (the test checks): what rlphf run reruns after a change is whatever these say.
CHANGES = [
    ("model.name", "tiny", model),
    ("model.prompt_format", "tulu", model),
    ("model.dtype", "float32", model),
    ("model.load_in_4bit", True, model),
    ("model.revision", "v2", model),
    ("model.trust_remote_code", True, model),
    ("seed", 1, lambda k: not k.startswith(("tiny-model", "merge/", "report"))),
    ("data.train_prompts", "builtin:tiny-eval", lambda k: k == "rollouts" or online(k)),
    ("data.max_train_prompts", 6, lambda k: k == "rollouts" or online(k)),
    ("data.eval_prompts", "builtin:tiny-train", lambda k: k.startswith("evaluate/")),
    ("data.max_eval_prompts", 3, lambda k: k.startswith("evaluate/")),
    ("generate.temperature", 0.7, sampling),
    ("generate.top_p", 0.9, sampling),
    ("generate.top_k", 5, sampling),
    ("generate.max_new_tokens", 9, sampling),
    ("generate.min_new_tokens", 1, sampling),
    ("generate.no_repeat_ngram_size", 3, sampling),
    ("generate.repetition_penalty", 1.1, sampling),
    ("generate.batch_size", 4, sampling),
    ("generate.compose", "logits", nothing),  # rlphf run's psoups are merged soup folders
    ("generate.num_samples", 3, nothing),  # rollouts take annotate.num_samples, evaluations one answer
    ("annotate.judge", "hf", lambda k: k.startswith("annotate/")),
    ("annotate.prefs", ["P1A"], nothing),  # rlphf run annotates every preference it trains
    ("annotate.num_samples", 3, lambda k: k == "rollouts"),
    ("annotate.pairs_per_prompt", 2, lambda k: k.startswith("annotate/")),
    ("train_rm.lora.r", 8, lambda k: k.startswith("train-rm/")),
    ("train_rm.lora.lora_alpha", 16.0, lambda k: k.startswith("train-rm/")),
    ("train_rm.lora.lora_dropout", 0.1, lambda k: k.startswith("train-rm/")),
    ("train_rm.lora.target_modules", ["q_proj", "v_proj"], lambda k: k.startswith("train-rm/")),
    ("train_rm.lora.bias", "lora_only", lambda k: k.startswith("train-rm/")),
    ("train_rm.eval_fraction", 0.2, lambda k: k.startswith("train-rm/")),
    ("train_rm.trl.max_steps", 2, lambda k: k.startswith("train-rm/")),
    ("train_policy.algo", "grpo", online),
    ("train_policy.mode", "morl", nothing),  # rlphf run trains every mode it evaluates, by name
    ("train_policy.lora.r", 8, lora),
    ("train_policy.lora.lora_alpha", 16.0, lora),
    ("train_policy.lora.lora_dropout", 0.1, lora),
    ("train_policy.lora.target_modules", ["q_proj"], lora),
    ("train_policy.lora.bias", "lora_only", lora),
    ("train_policy.rloo.max_steps", 2, online),
    ("train_policy.rloo.num_generations", 4, online),
    ("train_policy.grpo.max_steps", 2, nothing),  # the recipe trains with rloo
    ("train_policy.dpo.max_steps", 2, nothing),
    ("train_policy.sft.max_steps", 2, lambda k: k == "baselines/multitask"),
    ("train_policy.save_steps", 5, lora),
    ("train_policy.standardize_rewards", False, lambda k: k == "baselines/morl"),
    ("merge.method", "exact", lambda k: k.startswith("merge/P")),  # the sweep's soups are averages
    ("merge.rank", 4, nothing),  # average declares no parameter
    ("merge.density", 0.5, nothing),
    ("merge.seed", 3, nothing),
    ("judge.backend", "hf", judging),
    ("judge.both_orders", False, judging),
    ("judge.bootstrap_samples", 20, judging),
    ("judge.rubric.tie_margin", 0.1, nothing),  # no rubric judge in this recipe
    ("judge.openai.model", "gpt-x", nothing),
    ("judge.openai.base_url", "http://localhost:1/v1", nothing),
    ("judge.openai.api_key_env", "OTHER_KEY", nothing),
    ("judge.openai.concurrency", 2, nothing),
    ("judge.openai.max_retries", 1, nothing),
    ("judge.openai.timeout", 5.0, nothing),
    ("judge.openai.parse_retries", 1, nothing),
    ("judge.openai.temperature", 0.5, nothing),
    ("judge.openai.max_tokens", 8, nothing),
    ("judge.openai.price", {"input": 1.0, "output": 2.0}, nothing),
    ("judge.openai.batch_size", 5, nothing),
    ("judge.openai.mode", "batch", nothing),
    ("judge.openai.poll_interval", 1.0, nothing),
    ("judge.max_cost", 5.0, nothing),  # the coin judge is free; with openai: test_what_a_judge_is_paid_...
    ("judge.hf.model", "tiny", nothing),
    ("judge.hf.batch_size", 2, nothing),
    ("judge.coin.seed", 1, judges),
    ("preferences.define.0.prompt", "Answer very formally.", prompted_with("P4A")),
    ("preferences.define.0.criterion", "Which response is stiffer?",
     lambda k: k == "annotate/P4A" or judging(k)),
]
# Leaves no sweep row changes, and why: they name things or decide which units exist.
SKIPPED = {
    "name": "the run's name",
    "run_dir": "where every unit writes: a new run directory has no markers",
    "parallel": "how many worker processes train, not what they train",
    "preferences.use": "which preferences, hence which units, exist",
    "preferences.define.0.id": "a preference's name: units are named by it",
    "preferences.define.0.alias": "a preference's other name: messages and template files use it",
    "preferences.define.0.dimension": "which combinations exist",
    "preferences.define.1": "the second definition: its fields are the first's",
    "evaluation": "which systems and sweep soups exist",
    "judge.templates": "a folder; its texts are checked in test_a_changed_template_reruns_its_readers",
    "profile": "read by `rlphf profile learn` and serve's /v1/profiles only: no pipeline stage",
}


def recipe_from(tmp_path: Path, data: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**data, "run_dir": str(tmp_path / "run")}))
    return load_recipe(path)


def changed(tmp_path: Path, key: str, value, base: dict = BASE) -> tuple[set[str], Pipeline]:
    data = yaml.safe_load(yaml.safe_dump(base))
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    before = Pipeline(recipe_from(tmp_path, base))
    after = Pipeline(recipe_from(tmp_path, data))
    old, new = before.fingerprints(), after.fingerprints()
    assert set(old) == set(new), key  # a value, not the set of units
    return {k for k in old if old[k] != new[k]}, before


def downstream(pipeline: Pipeline, direct: set[str]) -> set[str]:
    units = [u for stage in pipeline.stages() for u in pipeline.units(stage)]
    found = set(direct)
    grew = True
    while grew:
        grew = False
        for unit in units:
            if unit.key not in found and found & set(unit.upstream):
                found.add(unit.key)
                grew = True
    return found


def leaves(node, prefix: str = ""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, value in enumerate(node):
            yield from leaves(value, f"{prefix}.{i}")
    else:
        yield prefix


def test_every_recipe_value_is_swept_or_said_why_not(tmp_path):
    covered = {key for key, _, _ in CHANGES}
    dump = recipe_from(tmp_path, BASE).model_dump(mode="json")
    missing = [leaf for leaf in leaves(dump)
               if leaf not in covered and not any(leaf == s or leaf.startswith(s + ".") for s in SKIPPED)]
    assert missing == []


@pytest.mark.parametrize(("key", "value", "reads"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_reruns_exactly_the_units_that_read_it_and_what_depends_on_them(tmp_path, key, value, reads):
    found, pipeline = changed(tmp_path, key, value)
    keys = {u.key for stage in pipeline.stages() for u in pipeline.units(stage)}
    direct = {k for k in keys if reads(k)}
    assert found == downstream(pipeline, direct), key
    if reads is not nothing:
        assert found, key


def test_what_a_judge_is_paid_is_not_what_it_answers(tmp_path):
    """With an openai judge annotating and judging: its price, spending limit, Batch API mode and poll
    interval rerun nothing (same requests, same answers); pairs per request ask another question."""
    paid = {**BASE, "annotate": {**BASE["annotate"], "judge": "openai"},
            "judge": {**BASE["judge"], "backend": "openai", "max_cost": 1.0,
                      "openai": {"base_url": "http://127.0.0.1:9/v1", "price": {"input": 1.0, "output": 2.0}}}}
    for key, value in (("judge.openai.price.input", 3.0), ("judge.max_cost", 5.0), ("judge.openai.mode", "batch"),
                       ("judge.openai.poll_interval", 1.0)):
        assert changed(tmp_path, key, value, paid)[0] == set(), key
    found, pipeline = changed(tmp_path, "judge.openai.batch_size", 5, paid)
    keys = {u.key for stage in pipeline.stages() for u in pipeline.units(stage)}
    assert found == downstream(pipeline, {k for k in keys if judges(k)})


def test_a_changed_template_reruns_its_readers(tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    base = {**BASE, "judge": {**BASE["judge"], "templates": str(folder)}}
    before = Pipeline(recipe_from(tmp_path, base)).fingerprints()
    (folder / "P2A_evaluate.txt").write_text("Judge. {criterion}\n{instruction}\n(a) {output_a}\n(b) {output_b}\n"
                                             "Answer \"Output (a)\", \"Output (b)\" or \"TIE\".")
    after = Pipeline(recipe_from(tmp_path, base)).fingerprints()
    # Every judgment may ask about P2A; annotation asks the annotate template, unchanged here.
    assert {k for k in before if before[k] != after[k]} == {k for k in before if k.startswith("judge/")} | {"report"}


def test_specs_are_frozen_picklable_and_hash_what_the_work_reads(tmp_path):
    pipeline = Pipeline(recipe_from(tmp_path, BASE))
    for stage in pipeline.stages():
        for unit in pipeline.units(stage):
            if unit.spec is None:
                continue
            assert dataclasses.is_dataclass(unit.spec)
            with pytest.raises(dataclasses.FrozenInstanceError):
                unit.spec.seed = 1  # type: ignore[misc]
            assert pickle.loads(pickle.dumps(unit.spec)) == unit.spec  # `parallel` sends jobs to workers
            assert "record" not in record(unit.spec)  # how to write the run's record is not an input
    job = pipeline.units("train-rm")[0].spec
    assert fingerprint(job) == fingerprint(dataclasses.replace(job, record=None))


def test_every_check_happens_when_the_recipe_loads_or_the_jobs_are_built(tmp_path):
    with pytest.raises(RecipeError, match=r"--set judge.backend: judge.backend: unknown judge 'opneai' \(did you mean 'openai'\?\)"):
        load_recipe(None, ["judge.backend=opneai"])
    with pytest.raises(RecipeError, match="annotate.judge: unknown judge 'rubrik'"):
        load_recipe(None, ["annotate.judge=rubrik"])
    with pytest.raises(RecipeError, match=r"merge.method: method 'ties' needs a density"):
        load_recipe(None, ["merge.method=ties"])
    with pytest.raises(RecipeError, match=r"--set merge.rank: merge.rank: expected a value >= 1, got 0"):
        load_recipe(None, ["merge.method=svd", "merge.rank=0"])
    recipe = load_recipe(None, ["train_policy.sft.lerning_rate=0.1", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(RecipeError, match="train_policy.sft.lerning_rate: unknown SFTConfig field"):
        Pipeline(recipe)  # rlphf run builds every job (and so checks every trainer) before any work
    assert not (tmp_path / "run").exists()


def test_the_sample_count_rules():
    from rlphf_cli.errors import InputError
    from rlphf_cli.jobs import sample_count
    from rlphf_cli.recipe import load_recipe

    sampled, greedy = load_recipe(), load_recipe(None, ["generate.temperature=0"])
    assert sample_count(sampled) == (1, None) and sample_count(sampled, rollouts=True) == (2, None)
    assert sample_count(sampled, 4) == (4, None)
    assert sample_count(greedy, rollouts=True)[0] == 1 and "greedy" in sample_count(greedy)[1]
    assert sample_count(load_recipe(None, ["generate.num_samples=3"]), rollouts=True) == (3, None)
    # `rlphf run` asks for annotate.num_samples rollouts: a greedy recipe cannot make pairs.
    with pytest.raises(InputError, match=r"annotate.num_samples \(.*tiny.yaml\) 2 with --set generate.temperature 0"):
        sample_count(greedy, greedy.annotate.num_samples,
                     requested_by=f"annotate.num_samples ({greedy.origin('annotate.num_samples')})")
