"""Builders: a frozen recipe, plus a command's options, into job specs (rlphf_cli.specs).

The one place that reads a recipe for the library and checks it: TRL fields against their config
class, merge parameters against the method, judge names, preference names. Errors name the recipe
file or the --set/flag a value came from. `rlphf run` and the stage commands build their jobs
here, with the same functions, so a unit of the pipeline and the command that redoes it do the
same work and have the same fingerprint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlphf_cli.errors import InputError, MissingArtifactError, RecipeError, did_you_mean
from rlphf_cli.preferences import Preference
from rlphf_cli.recipe import Recipe
from rlphf_cli.runs import RunDir
from rlphf_cli.specs import (
    POLICY_ALGOS,
    TRAINERS,
    AnnotateJob,
    Criterion,
    GenerateJob,
    JudgeCheckJob,
    JudgeJob,
    JudgeSpec,
    LearnSettings,
    LoraSpec,
    Member,
    MergeJob,
    MergeSpec,
    ModelSpec,
    PolicyJob,
    PromptedPreference,
    PromptSet,
    RewardModelJob,
    RunRecord,
    Sampling,
    ServeLimits,
    ServeSpec,
    TrainerSpec,
    Weights,
    frozen_items,
)

GENERAL = "general"  # the RLHF baseline's preference-agnostic reward model (annotations/general.jsonl)
MODES = ("soup", "morl", "rlhf", "multitask")
ADAPTER_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------------------------
# Pieces every job is made of


def run_record(recipe: Recipe) -> RunRecord:
    def env_names(node: Any):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    yield value
                yield from env_names(value)

    return RunRecord(root=recipe.resolved_run_dir(), recipe_yaml=recipe.run_yaml(), source=recipe.source,
                     seed=recipe.seed, overrides=frozen_items(recipe.overrides()),
                     secrets=tuple(dict.fromkeys(env_names(recipe.model_dump(mode="json")))))


def model_spec(recipe: Recipe, name: str | None = None) -> ModelSpec:
    m = recipe.model
    return ModelSpec(name=name or m.name, prompt_format=m.prompt_format, dtype=m.dtype, load_in_4bit=m.load_in_4bit,
                     revision=m.revision, trust_remote_code=m.trust_remote_code)


def lora_spec(section) -> LoraSpec:
    targets = section.target_modules
    return LoraSpec(r=section.r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                    target_modules=tuple(targets) if isinstance(targets, list) else targets, bias=section.bias)


def _section_fields(recipe: Recipe, algo: str) -> dict[str, Any]:
    node: Any = recipe
    for part in TRAINERS[algo].section.split("."):
        node = getattr(node, part)
    return dict(node)


def trainer_spec(recipe: Recipe, algo: str) -> TrainerSpec:
    """The recipe's TRL fields for `algo`, every key a field of its TRL config class and numbers
    read as numbers (YAML reads `5e-4` as a string). Imports trl."""
    import dataclasses as dc

    import trl

    trainer = TRAINERS[algo]
    config_class = getattr(trl, trainer.config)
    types = {f.name: str(f.type) for f in dc.fields(config_class)}
    fields = {}
    for key, value in _section_fields(recipe, algo).items():
        where = f"{trainer.section}.{key}"
        if key not in types:
            raise RecipeError(f"{recipe.origin(where)}: {where}: unknown {trainer.config} field{did_you_mean(key, types)}")
        kind = types[key]
        if key == "bf16" and value == "auto":  # rlphf's one addition: resolved per device (TrainerSpec.config)
            fields[key] = value
            continue
        if isinstance(value, str) and "str" not in kind and ("float" in kind or "int" in kind):
            try:
                value = int(value) if "float" not in kind else float(value)
            except ValueError:
                raise RecipeError(f"{recipe.origin(where)}: {where}: expected a number, got {value!r}") from None
        fields[key] = value
    return TrainerSpec(algo=algo, fields=frozen_items(fields), seed=recipe.seed,
                       origin=recipe.origin(trainer.section))


def check_trainers(recipe: Recipe) -> None:
    """Every trainer section of the recipe, checked (rlphf run checks them all before any work)."""
    for algo in TRAINERS:
        trainer_spec(recipe, algo)


def merge_spec(recipe: Recipe) -> MergeSpec:
    """The recipe's merge method with the parameters it declares (checked when the recipe loads)."""
    from rlphf_cli.merging.methods import merge_spec as checked

    return checked(recipe.merge.method, recipe.merge.model_dump(exclude={"method"}))


def sampling(recipe: Recipe) -> Sampling:
    g = recipe.generate
    return Sampling(g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.min_new_tokens, g.no_repeat_ngram_size,
                    g.repetition_penalty, recipe.seed)


def prompted(prefs: Sequence[Preference]) -> tuple[PromptedPreference, ...]:
    return tuple(PromptedPreference(p.id, p.dimension, p.prompt) for p in prefs)


def criteria(prefs: Sequence[Preference], backend: str) -> tuple[Criterion, ...]:
    """What `backend` is asked about each preference: the criterion text reaches a judge only through
    its templates, so a backend without templates (the rubric) is given none."""
    from rlphf_cli.judges import JUDGES

    with_text = JUDGES.get(backend).uses_templates
    return tuple(Criterion(p.id, p.alias, p.criterion if with_text else "") for p in prefs)


def judge_spec(recipe: Recipe, backend: str, prefs: Sequence[Preference],
               uses: Sequence[str] = ("annotate", "evaluate")) -> JudgeSpec:
    """A judge backend with its settings and, when it renders templates, the text of every template
    it may use for `prefs` in `uses` (read and checked now; with a `batch_size` above 1, the
    templates of batched requests too), and the recipe's spending limit."""
    from rlphf_cli.judges import JUDGES, TemplateSet

    entry = JUDGES.get(backend)
    settings = getattr(recipe.judge, backend, None)
    templates = []
    if entry.uses_templates:
        found = TemplateSet(recipe.judge.templates)
        batched = getattr(settings, "batch_size", 1) > 1
        for pref in prefs:
            kinds = [k for use in uses for k in ([use, f"{use}_batch", "batch_pair"] if batched else [use])]
            templates += [(pref.id, kind, found.text(pref, kind)) for kind in dict.fromkeys(kinds)]
    return JudgeSpec(backend=backend, settings=settings, templates=tuple(templates), max_cost=recipe.judge.max_cost)


def run_dir(recipe: Recipe) -> RunDir:
    return RunDir(recipe.resolved_run_dir())


# --------------------------------------------------------------------------------------------
# Reward models


def rm_name(recipe: Recipe, name: str) -> tuple[str, str]:
    """(id, alias) of a preference, or ('general', 'general') for the RLHF baseline's reward model."""
    if name.strip().lower() == GENERAL:
        return GENERAL, GENERAL
    found = recipe.preference_set().get(name)
    return found.id, found.alias


def rm_names(recipe: Recipe, prefs: str | Sequence[str]) -> list[str]:
    """'all', 'P1A,concise', 'general' -> reward-model ids, in the order given."""
    if isinstance(prefs, str):
        prefs = [p.strip() for p in prefs.split(",") if p.strip()]
    names: list[str] = []
    for name in prefs:
        resolved = [p.id for p in recipe.preference_set()] if name.lower() == "all" else [rm_name(recipe, name)[0]]
        names += [n for n in resolved if n not in names]
    if not names:
        raise InputError("no preference given")
    return names


def output_folders(ids: list[str], out_dir: str | Path | None, default) -> dict[str, Path]:
    """Where each of several models goes: `out_dir` for one, `<out_dir>/<id>` for several, else the
    run directory's `default(id)`."""
    if out_dir is None:
        return {i: default(i) for i in ids}
    return {i: Path(out_dir) / i if len(ids) > 1 else Path(out_dir) for i in ids}


def reward_model_jobs(recipe: Recipe, prefs: str | Sequence[str], *, data: str | Path | None = None,
                      out: str | Path | None = None) -> list[RewardModelJob]:
    """One job per reward model ('all', 'P1A,concise', 'general'); with several, `out` is a parent
    folder (<out>/<id>) and `data` (one annotations file) is refused."""
    ids = rm_names(recipe, prefs)
    if len(ids) > 1 and data is not None:
        raise InputError("--data names one annotations file: use it with a single --prefs")
    run = run_dir(recipe)
    targets = output_folders(ids, out, run.reward_model)
    model, lora, trainer, record = (model_spec(recipe), lora_spec(recipe.train_rm.lora),
                                    trainer_spec(recipe, "reward"), run_record(recipe))
    return [RewardModelJob(pref_id=i, alias=rm_name(recipe, i)[1], data=Path(data) if data else run.annotations(i),
                           out=targets[i], model=model, lora=lora, trainer=trainer,
                           eval_fraction=recipe.train_rm.eval_fraction, seed=recipe.seed, record=record)
            for i in ids]


# --------------------------------------------------------------------------------------------
# Policies


def policy_jobs(recipe: Recipe, prefs: str | None = None, *, mode: str | None = None, algo: str | None = None,
                reward_model: str | Path | None = None, prompts: str | None = None,
                out: str | Path | None = None) -> list[PolicyJob]:
    """Mode soup: one job per preference ('all', 'P1A,concise'); other modes: their one policy.
    `mode`/`algo` default to the recipe's; `reward_model` replaces the run's reward model (one
    policy); `prompts` the recipe's training prompts; with several policies `out` is a parent."""
    mode = mode or recipe.train_policy.mode
    if mode not in MODES:
        raise InputError(f"--mode: unknown mode '{mode}'{did_you_mean(mode, MODES)}")
    if mode == "multitask":
        if algo not in (None, "sft"):
            raise InputError("--algo does not apply to mode multitask: it fine-tunes on the judge-chosen responses "
                             "(TRL SFT, settings in train_policy.sft)")
        algo = "sft"
    algo = algo or recipe.train_policy.algo
    if algo not in POLICY_ALGOS and algo != "sft":
        raise InputError(f"--algo: unknown algorithm '{algo}'{did_you_mean(algo, POLICY_ALGOS)}")
    if algo == "dpo" and mode == "morl":
        raise InputError("--algo dpo trains from one annotations file: use it with mode soup or rlhf")
    if reward_model is not None and (mode in ("morl", "multitask") or algo == "dpo"):
        raise InputError(f"--reward-model does not apply to {'--algo dpo' if algo == 'dpo' else 'mode ' + mode}")
    available = recipe.preference_set()
    if mode == "soup":
        if not prefs:
            raise InputError("mode soup trains one policy per preference: give --prefs (an id, an alias or 'all')")
        chosen = available.resolve(prefs)
        if len(chosen) > 1 and reward_model is not None:
            raise InputError("--reward-model names one reward model: use it with a single --prefs")
        names = [p.id for p in chosen]
    else:
        if prefs:
            raise InputError(f"--prefs does not apply to mode {mode}: it trains one policy for all preferences")
        names = [mode]
    run = run_dir(recipe)
    targets = output_folders(names, out, run.policy)
    common = {"model": model_spec(recipe), "lora": lora_spec(recipe.train_policy.lora),
              "trainer": trainer_spec(recipe, algo), "seed": recipe.seed,
              "save_steps": recipe.train_policy.save_steps, "record": run_record(recipe)}
    prompt_set = None if not TRAINERS[algo].online else PromptSet(prompts or recipe.data.train_prompts,
                                                                  recipe.data.max_train_prompts)
    jobs = []
    for name in names:
        # Whose reward models (online) or annotations (offline) the policy learns from.
        if mode == "soup":
            sources = [available.get(name)]
        elif mode == "rlhf":
            sources = [None]
        else:
            sources = list(available)
        labelled = [(GENERAL, GENERAL) if p is None else (p.id, p.alias) for p in sources]
        if TRAINERS[algo].online:
            rms = tuple((i, a, Path(reward_model) if reward_model else run.reward_model(i)) for i, a in labelled)
            anns: tuple = ()
        else:
            rms, anns = (), tuple((i, a, run.annotations(i)) for i, a in labelled)
        # The preference prompts the training prompts carry: sampled combinations (morl) or each
        # pair's own preference (multitask); the experts and rlhf train on plain instructions.
        carried = prompted(available) if mode in ("morl", "multitask") else ()
        standardize = mode == "morl" and TRAINERS[algo].online and recipe.train_policy.standardize_rewards
        jobs.append(PolicyJob(name=name, mode=mode, out=targets[name], reward_models=rms, annotations=anns,
                              prefs=carried, prompts=prompt_set, standardize_rewards=standardize, **common))
    return jobs


def missing_inputs(jobs: Sequence[RewardModelJob | PolicyJob | MergeJob]) -> list[tuple[str, Path, str]]:
    """(what, path, command) of every input of `jobs` that is not there yet."""
    missing = []
    for job in jobs:
        needs = job.inputs() if callable(job.inputs) else [
            (f"policy {path.name}", path, f"rlphf train-policy --prefs {path.name}") for path in job.inputs]
        for what, path, command in needs:
            present = (path / ADAPTER_CONFIG).is_file() if what.startswith(("reward model", "policy")) else path.exists()
            if not present and (what, path, command) not in missing:
                missing.append((what, path, command))
    return missing


def require_inputs(jobs: Sequence[RewardModelJob | PolicyJob]) -> None:
    """Every input of `jobs`, or a MissingArtifactError naming the first missing one."""
    missing = missing_inputs(jobs)
    if missing:
        what, path, command = missing[0]
        raise MissingArtifactError(what, path, command)


# --------------------------------------------------------------------------------------------
# Generation


def _where(recipe: Recipe, key: str) -> str:
    origin = recipe.origin(key)
    return origin if origin.startswith("--") else f"{key} ({origin})"


def sample_count(recipe: Recipe, requested: int | None = None, *, rollouts: bool = False,
                 requested_by: str = "--num-samples", temperature_by: str | None = None) -> tuple[int, str | None]:
    """How many responses per prompt, decided in one place: (count, a note for the summary or None).

    `requested`: an explicit count (a flag); else `generate.num_samples` when the recipe sets it,
    else 1, or for rollouts `annotate.num_samples` (pairs need two). Greedy decoding
    (temperature 0) has one answer per prompt: without an explicit count it gets 1 (said in the
    note); an explicit count above 1 is an error naming both settings.
    """
    greedy = recipe.generate.temperature == 0
    temperature_by = temperature_by or _where(recipe, "generate.temperature")
    if requested is None and "num_samples" in recipe.generate.model_fields_set:
        requested, requested_by = recipe.generate.num_samples, _where(recipe, "generate.num_samples")
    if requested is not None:
        if requested < 1:
            raise InputError(f"{requested_by}: expected at least 1 response per prompt, got {requested}")
        if greedy and requested > 1:
            raise InputError(f"{requested_by} {requested} with {temperature_by} 0: greedy decoding gives one response "
                             f"per prompt; sample with a temperature above 0, or ask for 1")
        return requested, None
    if greedy:
        return 1, "greedy decoding (temperature 0): one response per prompt"
    return (max(recipe.generate.num_samples, recipe.annotate.num_samples) if rollouts
            else recipe.generate.num_samples), None


def resolve_adapter(recipe: Recipe, name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """A folder, or a preference name/id meaning the run's trained policy for it -> (folder, label)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / ADAPTER_CONFIG).is_file():
            raise InputError(f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        return path, path.name
    prefs = recipe.preference_set()
    if str(name_or_path).lower() not in {n.lower() for n in prefs.names()}:
        raise InputError(f"{name_or_path}: no such adapter folder, and not a preference of the recipe "
                         f"(choose from: {', '.join(prefs.names())})")
    pref = prefs.get(str(name_or_path))
    folder = run_dir(recipe).policy(pref.id)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise MissingArtifactError(f"policy for {pref.id} ({pref.alias})", folder,
                                   f"rlphf train-policy --prefs {pref.alias}")
    return folder, pref.id


def weights(recipe: Recipe, adapter: str | os.PathLike | None = None,
            soup: Sequence[tuple[str, float]] | None = None) -> Weights:
    """What a generator decodes with: the base model, one adapter (a folder or a preference's
    policy), or a soup [(name or folder, weight)] merged with the recipe's method, members in
    catalog order ('friendly=0.3,concise=0.7' is the soup 'P2A=0.7+P3A=0.3')."""
    if adapter is not None and soup is not None:
        raise InputError("give an adapter or a soup, not both")
    if adapter is not None:
        return Weights((Member(*resolve_adapter(recipe, adapter)),))
    if soup is None:
        return Weights()
    if not soup:
        raise InputError("the soup has no members")
    members = [Member(*resolve_adapter(recipe, name), float(weight)) for name, weight in soup]
    ordered = recipe.preference_set().in_order(members, key=lambda m: m.label)
    compose = recipe.generate.compose
    if compose == "logits":
        from rlphf_cli.generation import mix_weights

        mix_weights([m.weight for m in ordered])  # refused now, before a model loads
    return Weights(tuple(ordered), merge_spec(recipe), compose)


def generate_job(recipe: Recipe, out: str | Path, *, prompts: PromptSet, weights_: Weights = Weights(),
                 prefs: Sequence[Preference] = (), num_samples: int = 1, system: str | None = None) -> GenerateJob:
    return GenerateJob(model=model_spec(recipe), prompts=prompts, out=Path(out), weights=weights_,
                       prefs=prompted(prefs), sampling=sampling(recipe), num_samples=num_samples,
                       batch_size=recipe.generate.batch_size, system=system or weights_.system(),
                       record=run_record(recipe))


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """What `rlphf generate` was asked, resolved: its jobs (one per output file), and a note."""

    jobs: tuple[GenerateJob, ...]
    note: str | None = None
    notes: tuple[str, ...] = ()  # about the mixes (two preferences of one dimension)


def generate_request(recipe: Recipe, *, adapter: str | None = None, soup: Sequence[tuple[str, float]] | None = None,
                     prefs: str | None = None, combos: str | None = None, prompts: str | None = None,
                     limit: int | None = None, num_samples: int | None = None, out: str | Path | None = None,
                     system: str | None = None, temperature_by: str | None = None) -> GenerateRequest:
    """`rlphf generate`: with no adapter, soup or preferences, the rollouts for annotation (training
    prompts, N samples each) into the run directory; else evaluation outputs under
    generations/<system>/. An adapter or soup is prompted with its own preferences unless `prefs`
    says otherwise ('none': no prompt); the base model with preferences is the system `prompted`."""
    from rlphf_cli.preferences import combination_name, same_dimension_note
    from rlphf_cli.systems import PROMPTED

    if prefs and combos:
        raise InputError("--prefs and --combos: give one (--combos writes one file per combination)")
    available = recipe.preference_set()
    chosen = weights(recipe, adapter, soup)
    if prefs is None and chosen.members:  # a policy is prompted with its preferences, in catalog order
        named = {m.label.lower() for m in chosen.members}
        pref_list = [p for p in available if {p.id.lower(), p.alias.lower()} & named]
    else:
        pref_list = [] if prefs in (None, "none") else available.resolve(prefs)
    combinations = resolve_combinations(recipe, combos) if combos else None
    notes = tuple(n for n in (same_dimension_note(mix) for mix in [pref_list, *(combinations or [])]) if n)
    rollouts = not (chosen.members or pref_list or combinations)
    if system is None and not chosen.members and (pref_list or combinations):
        system = PROMPTED  # the base model with preference prompts, as the run directory names it
    source = prompts or (recipe.data.train_prompts if rollouts else recipe.data.eval_prompts)
    default_limit = recipe.data.max_train_prompts if rollouts else recipe.data.max_eval_prompts
    prompt_set = PromptSet(source, limit or (None if prompts else default_limit))
    count, note = sample_count(recipe, num_samples, rollouts=rollouts, temperature_by=temperature_by)
    system = system or chosen.system()
    run = run_dir(recipe)
    folder = system.replace(":", "-")
    if combinations is not None:
        out_dir = Path(out) if out else run.path("generations", folder)
        files = [(combo, out_dir / f"{combination_name(combo)}.jsonl") for combo in combinations]
    else:
        files = [(tuple(pref_list), Path(out) if out else (run.rollouts() if rollouts else run.generations(
            folder, combination_name(pref_list) or "none")))]
    jobs = tuple(generate_job(recipe, path, prompts=prompt_set, weights_=chosen, prefs=combo, num_samples=count,
                              system=system) for combo, path in files)
    return GenerateRequest(jobs, note, notes)


def resolve_combinations(recipe: Recipe, combos: str | Sequence[str]) -> list[tuple[Preference, ...]]:
    prefs = recipe.preference_set()
    if combos == "all" or combos == ["all"]:
        return prefs.combinations()
    names = [c.strip() for c in combos.split(",")] if isinstance(combos, str) else list(combos)
    out = [prefs.parse_combination(name) for name in names if name]
    if not out:
        raise InputError("no combination given")
    return out


# --------------------------------------------------------------------------------------------
# Judging


def annotate_job(recipe: Recipe, *, rollouts: str | Path | None = None, prefs: str | Sequence[str] | None = None,
                 out_dir: str | Path | None = None, judge: str | None = None) -> AnnotateJob:
    """Label rollout pairs for `prefs` ('all', 'P1A,concise', None: annotate.prefs; 'general' is
    the RLHF baseline's criterion) with `judge` (default annotate.judge)."""
    from rlphf_cli.judges import GENERAL_PREFERENCE

    chosen = []
    for name in _names(prefs if prefs is not None else recipe.annotate.prefs):
        if name.lower() == GENERAL:
            chosen.append(GENERAL_PREFERENCE)
        else:
            chosen += [p for p in recipe.preference_set().resolve(name) if p not in chosen]
    if not chosen:
        raise InputError("no preference to annotate")
    run = run_dir(recipe)
    backend = judge or recipe.annotate.judge
    return AnnotateJob(rollouts=Path(rollouts) if rollouts else run.rollouts(),
                       out_dir=Path(out_dir) if out_dir else run.path("annotations"), criteria=criteria(chosen, backend),
                       judge=judge_spec(recipe, backend, chosen, uses=("annotate",)),
                       pairs_per_prompt=recipe.annotate.pairs_per_prompt,
                       seed=recipe.seed, record=run_record(recipe))


def _names(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()] if value != "all" else ["all"]
    return list(value)


def judge_job(recipe: Recipe, a: str | Path | Sequence[str | Path], b: str | Path | Sequence[str | Path], *,
              criteria_: str | Sequence[str] | None = None, out: str | Path | None = None, common: bool = False,
              backend: str | None = None) -> JudgeJob:
    """System A's generations (a file, a folder or files) against system B's, judged by `backend`
    (default judge.backend) on `criteria_` ('combo': each record's own, 'all', or names)."""
    def paths(value) -> tuple[Path, ...]:
        return (Path(value),) if isinstance(value, (str, Path)) else tuple(Path(p) for p in value)

    prefs = list(recipe.preference_set())
    if criteria_ not in (None, "combo", "all"):
        recipe.preference_set().resolve(criteria_)  # an unknown name fails now, with a suggestion
    wanted = "combo" if criteria_ is None else criteria_ if isinstance(criteria_, str) else tuple(criteria_)
    backend = backend or recipe.judge.backend
    return JudgeJob(a=paths(a), b=paths(b), preferences=criteria(prefs, backend),
                    judge=judge_spec(recipe, backend, prefs, uses=("evaluate",)), criteria=wanted,
                    both_orders=recipe.judge.both_orders, bootstrap_samples=recipe.judge.bootstrap_samples,
                    seed=recipe.seed, common=common, out=Path(out) if out else None, record=run_record(recipe))


def judge_check_job(recipe: Recipe, labels: str | Path | None = None, *, backend: str | None = None) -> JudgeCheckJob:
    """`backend` (default judge.backend) on labelled pairs (default: the shipped set) of any
    preference the recipe knows, used or not; verdicts cached under $RLPHF_HOME/judge-check/."""
    from rlphf_cli.judges.annotate import CACHE_NAME
    from rlphf_cli.judges.check import CACHE_DIR, shipped_labels
    from rlphf_cli.models.cache import rlphf_home

    prefs = list(recipe.known_preferences())
    backend = backend or recipe.judge.backend
    return JudgeCheckJob(labels=Path(labels) if labels else shipped_labels(), preferences=criteria(prefs, backend),
                         judge=judge_spec(recipe, backend, prefs, uses=("evaluate",)),
                         cache=rlphf_home() / CACHE_DIR / CACHE_NAME, bootstrap_samples=recipe.judge.bootstrap_samples,
                         seed=recipe.seed)


# --------------------------------------------------------------------------------------------
# Merging


def merge_request(recipe: Recipe, *, adapters: Sequence[str | Path] = (), soup: str | None = None,
                  prefs: str | None = None, weights: str | None = None, **options: Any) -> tuple[MergeJob, str | None]:
    """`rlphf merge` as given: adapter folders with --weights, a --soup of the run's policies, or the
    older --prefs with --weights -> (its job, a note about the mix or None)."""
    from rlphf_cli.generation import parse_soup
    from rlphf_cli.merging.soup import parse_weights
    from rlphf_cli.preferences import same_dimension_note

    if soup and (prefs or weights):
        raise InputError("--soup holds the weights (concise=0.7,friendly=0.3): drop --prefs and --weights")
    members = parse_soup(soup) if soup else None
    if prefs and not adapters:
        names = [n.strip() for n in prefs.split(",") if n.strip()]
        members = list(zip(names, parse_weights(weights, len(names)), strict=True))
    trained_note = None
    if not (adapters or members) and weights:
        members, trained_note = trained_soup(recipe, weights)
    if not (adapters or members):
        raise InputError(f"nothing to merge: give --soup (e.g. {example_soup(recipe)}) or adapter folders")
    note = same_dimension_note(recipe.preference_set().resolve([n for n, _ in members])) if members else None
    note = "; ".join(n for n in (trained_note, note) if n) or None
    return merge_job(recipe, adapters=adapters, soup=members, weights=weights, **options), note


def trained_policies(recipe: Recipe) -> list[Preference]:
    """The recipe's preferences whose policy the run directory holds, in catalog order."""
    run = run_dir(recipe)
    return [p for p in recipe.preference_set() if (run.policy(p.id) / ADAPTER_CONFIG).is_file()]


def example_soup(recipe: Recipe) -> str:
    """A soup that names real policies: the run's trained ones, else the recipe's first preferences of
    two dimensions (what `rlphf train-policy` would make)."""
    chosen = trained_policies(recipe)
    if len(chosen) < 2:
        seen: dict[str, Preference] = {}
        for pref in recipe.preference_set():
            seen.setdefault(pref.dimension, pref)
        chosen = list(seen.values())[:2] or list(recipe.preference_set())[:2]
    return ",".join(f"{p.alias}={round(1 / len(chosen), 3):g}" for p in chosen)


def trained_soup(recipe: Recipe, weights: str) -> tuple[list[tuple[str, float]], str]:
    """`rlphf merge --weights 0.5,0.5` alone: the run's trained policies (catalog order) when there are
    as many as weights -> ([(alias, weight)], a note saying so); else one error listing them with a
    --soup command to paste."""
    from rlphf_cli.merging.soup import parse_weights

    given = [w.strip() for w in weights.split(",") if w.strip()]
    trained = trained_policies(recipe)
    if trained and len(trained) == len(given):
        members = list(zip([p.alias for p in trained], parse_weights(weights, len(trained)), strict=True))
        return members, "merging the run's policies: " + ",".join(f"{a}={w:g}" for a, w in members)
    have = (f"{len(trained)} trained polic{'y' if len(trained) == 1 else 'ies'} "
            f"({', '.join(f'{p.id} {p.alias}' for p in trained)})" if trained else "no trained policy")
    raise InputError(f"--weights gives {len(given)} weight{'s' if len(given) != 1 else ''} and {run_dir(recipe).root} "
                     f"has {have}: name the soup, e.g. rlphf merge --soup {example_soup(recipe)}")


def merge_job(recipe: Recipe, *, adapters: Sequence[str | Path] = (), soup: Sequence[tuple[str, float]] | None = None,
              weights: str | Sequence[float] | None = None, out: str | Path | None = None,
              into_base: str | Path | None = None, base_model: str | None = None,
              explicit: Sequence[str] = (), check_inputs: bool = True) -> MergeJob:
    """`rlphf merge`: adapter folders with `weights` (and `out`), or a soup of the run's policies
    [(preference, weight)] (default out: soups/<combo>/, the weights in the name unless equal).
    The method and its parameters are the recipe's; `explicit` names the parameters set on the
    command line (an error where the method does not use them). `check_inputs`: a missing policy of
    the soup is an error here (else the caller checks, e.g. rlphf_cli.pipeline.make_inputs)."""
    from rlphf_cli.merging.methods import METHODS, merger
    from rlphf_cli.merging.soup import parse_weights
    from rlphf_cli.preferences import soup_name

    spec = merge_spec(recipe)
    for name in explicit:
        if name not in METHODS.get(spec.method).params:
            users = [m for m in METHODS.names() if name in METHODS.get(m).params]
            raise InputError(f"--{name} does not apply to --merge-method {spec.method} (it is for {', '.join(users)})")
    if adapters and soup:
        raise InputError("give adapter folders or --soup, not both")
    common = {"merge": spec, "into_base": Path(into_base) if into_base else None, "base_model": base_model,
              "record": run_record(recipe)}
    if adapters:
        if out is None:
            raise InputError("--out is required when merging adapter folders (it defaults to soups/<combo>/ "
                             "only with --soup)")
        return MergeJob(inputs=tuple(Path(a) for a in adapters), weights=tuple(parse_weights(weights, len(adapters))),
                        out=Path(out), **common)
    if not soup:  # merging every policy found would mix opposite preferences of each dimension
        raise InputError(f"nothing to merge: name the preferences, e.g. --soup {example_soup(recipe)}")
    available = recipe.preference_set()
    pairs = available.in_order([(available.get(name), weight) for name, weight in soup], key=lambda pw: pw[0].id)
    chosen, given = [p for p, _ in pairs], parse_weights([w for _, w in pairs], len(pairs))
    run = run_dir(recipe)
    for pref in chosen if check_inputs else ():
        if not (run.policy(pref.id) / ADAPTER_CONFIG).is_file():
            raise MissingArtifactError(f"policy for {pref.id} ({pref.alias})", run.policy(pref.id),
                                       f"rlphf train-policy --prefs {pref.alias}")
    # Named by the weights the method uses: average at 0.5/0.5/0.5 is the equal-share soup.
    default_out = run.soup(soup_name([p.id for p in chosen], merger(spec).check_weights(given)))
    return MergeJob(inputs=tuple(run.policy(p.id) for p in chosen), weights=tuple(given),
                    out=Path(out) if out else default_out, labels=tuple(p.id for p in chosen), **common)


# --------------------------------------------------------------------------------------------
# Serving


def serve_spec(recipe: Recipe, extra: Sequence[str] = (), limits: ServeLimits = ServeLimits()) -> ServeSpec:
    """The run directory's policy/<id>/ folders (every preference of the recipe that has one), then
    `extra` 'NAME=PATH' policies; NAME may be a preference id or alias (its prompt is then known),
    or any other name. `limits`: what one request may ask (the --max-... options)."""
    import re

    from rlphf_cli.serving.policies import BASE, SOUP

    prefs = recipe.preference_set()
    run = run_dir(recipe)
    found: dict[str, Path] = {p.id: run.policy(p.id) for p in prefs if (run.policy(p.id) / ADAPTER_CONFIG).is_file()}
    known = {n.lower() for n in prefs.names()}
    for item in extra:
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name or not path:
            raise InputError(f"--policy '{item}': expected NAME=PATH, e.g. --policy concise=runs/x/policy/P2A")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name in (BASE, SOUP):
            raise InputError(f"--policy '{item}': NAME must be letters, digits, '_' or '-' (and not '{BASE}' or '{SOUP}')")
        folder = Path(path).expanduser()
        if not (folder / ADAPTER_CONFIG).is_file():
            raise InputError(f"--policy {name}={path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        found[prefs.get(name).id if name.lower() in known else name] = folder
    if not found:
        raise MissingArtifactError("per-preference policies", run.path("policy"),
                                   "rlphf train-policy --prefs all (or give --policy NAME=PATH)")
    ordered = prefs.in_order(found.items(), key=lambda item: item[0])
    return ServeSpec(model=model_spec(recipe), policies=tuple(ordered), preferences=tuple(prefs),
                     merge=merge_spec(recipe), sampling=sampling(recipe), limits=check_limits(limits),
                     run_dir=run.root, eval_prompts=PromptSet(recipe.data.eval_prompts, recipe.data.max_eval_prompts),
                     learn=learn_settings(recipe))


def learn_settings(recipe: Recipe) -> LearnSettings:
    return LearnSettings(**recipe.profile.model_dump(), seed=recipe.seed)


def check_limits(limits: ServeLimits) -> ServeLimits:
    """Every limit is at least 1 (--max-requests-per-key: 0 turns it off); named as its option."""
    for name, value in dataclasses.asdict(limits).items():
        least = 0 if name == "max_requests_per_key" else 1
        if value is not None and value < least:
            raise InputError(f"--{name.replace('_', '-')} must be at least {least} (got {value})")
    return limits
