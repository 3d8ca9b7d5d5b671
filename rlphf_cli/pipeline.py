"""`rlphf run`: the stages of Personalized Soups in order, resumable.

Each stage runs through the same library functions as the commands. A stage is made of units
(one per preference, combination or system); every unit leaves a marker holding the fingerprint
of its inputs (the recipe sections it reads and the fingerprints of the units it depends on), so a
rerun skips finished units whose inputs did not change and recomputes everything downstream of a
change.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlphf_cli.errors import InputError, did_you_mean
from rlphf_cli.models import builtin_model, torch_threads
from rlphf_cli.preferences import Preference, combination_name
from rlphf_cli.recipe import Recipe
from rlphf_cli.runs import RunDir, fingerprint
from rlphf_cli.systems import BASE, BASE_PLAIN, EXPERTS, ORDER, PROMPTED, PSOUPS, SWEEP, TRAINED_BASELINES
from rlphf_cli.training import is_main_process, world_size

STAGE_NAMES = ("tiny-model", "rollouts", "annotate", "train-rm", "train-policy", "baselines", "merge",
               "evaluate", "judge", "report")
# Stages whose units train with TRL: under torchrun / accelerate launch every process runs them together.
TRAINING_STAGES = ("train-rm", "train-policy", "baselines")
# Stages with one unit per preference (key '<stage>/<id>'), which --prefs can pick.
PER_PREFERENCE_STAGES = ("annotate", "train-rm", "train-policy")


@dataclass(frozen=True)
class Stage:
    name: str
    description: str


@dataclass
class Unit:
    """One resumable piece of work inside a stage."""

    key: str  # marker name, e.g. 'train-rm/P2A'
    label: str
    inputs: dict  # what the work depends on; its fingerprint decides whether to redo it
    work: Callable[[], dict | None]
    outputs: list[Path] = field(default_factory=list)


# A progress sink gets ("stage", index, total, name, n_units), ("unit-start", label),
# ("unit", done, n_units, label), ("inner", done, total) and ("stage-end", name, counts, seconds).
Progress = Callable[..., None]


def _quiet(*_args, **_kwargs) -> None:
    pass


def plan(recipe: Recipe) -> list[Stage]:
    """The stages a recipe runs, with what each will do, for --dry-run and progress display."""
    prefs = recipe.preference_set()
    ids = ", ".join(p.id for p in prefs)
    combos = prefs.combinations()
    baselines = recipe.evaluation.baselines
    stages = []
    builtin = builtin_model(recipe.model.name)
    if builtin is not None:
        stages.append(Stage("tiny-model", f"build {builtin.name} if it is not cached: {builtin.description}"))
    stages += [
        Stage("rollouts", f"{recipe.annotate.num_samples} samples per training prompt from {recipe.model.name}"),
        Stage("annotate", f"label pairs for {ids} with the '{recipe.annotate.judge}' judge"),
        Stage("train-rm", f"one LoRA reward model (r={recipe.train_rm.lora.r}) per preference: {ids}"
              + (" and a general one (rlhf)" if "rlhf" in baselines else "")),
        Stage("train-policy",
              f"one LoRA policy (r={recipe.train_policy.lora.r}, {recipe.train_policy.algo}) per preference: {ids}"),
    ]
    trained = [b for b in baselines if b in TRAINED_BASELINES]
    if trained:
        stages.append(Stage("baselines", f"train baseline policies: {', '.join(trained)}"))
    sweep = recipe.evaluation.sweep
    sweep_text = f"; sweep {'/'.join(sweep.prefs)} at weights {sweep.weights}" if sweep else ""
    stages += [
        Stage("merge", f"{len(combos)} soups with '{recipe.merge.method}': "
              + ", ".join(combination_name(c) for c in combos) + sweep_text),
        Stage("evaluate", f"generate on the evaluation prompts: psoups, experts, {', '.join(baselines)} "
              f"x {len(combos)} combinations"),
        Stage("judge", f"with the '{recipe.judge.backend}' judge: every system against base, P-Soups head to head "
              "against each other system, each expert against the base model given its preference prompt"),
        Stage("report", "report.md with win-rate tables, reward-model accuracies, curves, sweep and costs"),
    ]
    return stages


# --------------------------------------------------------------------------------------------
# Units of each stage


class Pipeline:
    def __init__(self, recipe: Recipe, progress: Progress | None = None):
        self.recipe = recipe
        # Under a distributed launch only the main process writes the run's records (recipe, events, markers).
        self.main = is_main_process()
        root = recipe.resolved_run_dir()
        self.run = RunDir.open(root, recipe, run_recipe=True) if self.main else RunDir(root)
        self.prefs = recipe.preference_set()
        self.combos = self.prefs.combinations()
        self.progress = progress or _quiet
        self.fp: dict[str, str] = {}  # unit key -> fingerprint, for downstream inputs
        self._model_path: str | None = None
        self._base_generator = None

    # The base model, resolved once (a built-in model is built on first use).
    @property
    def model_path(self) -> str:
        if self._model_path is None:
            from rlphf_cli.models import resolve_model

            self._model_path = resolve_model(self.recipe.model.name)
        return self._model_path

    def base_generator(self):
        """The base model, loaded once for every unit that decodes without an adapter."""
        if self._base_generator is None:
            from rlphf_cli.generation import Generator

            self._base_generator = Generator.load(self.recipe, system=BASE)
        return self._base_generator

    def units(self, stage: str) -> list[Unit]:
        return getattr(self, "_units_" + stage.replace("-", "_"))()

    def _units_tiny_model(self) -> list[Unit]:
        return [Unit("tiny-model", self.recipe.model.name, {"model": self.recipe.model.name},
                     lambda: {"path": self.model_path})]

    def _units_rollouts(self) -> list[Unit]:
        from rlphf_cli.data import load_prompts

        def work():
            from rlphf_cli.generation import generate_file

            prompts = load_prompts(self.recipe.data.train_prompts, self.recipe.data.max_train_prompts)
            return generate_file(self.recipe, prompts, self.run.rollouts(), prefs=(), system=BASE,
                                 num_samples=self.recipe.annotate.num_samples, generator=self.base_generator(),
                                 progress=self._unit_progress,
                                 requested_by=f"annotate.num_samples ({self.recipe.origin('annotate.num_samples')})")

        inputs = {**self.recipe.settings("model", "data", "generate", "seed"), "num_samples": self.recipe.annotate.num_samples}
        return [Unit("rollouts", "rollouts", inputs, work, [self.run.rollouts()])]

    def _annotation_prefs(self) -> list[Preference]:
        prefs = list(self.prefs)
        if "rlhf" in self.recipe.evaluation.baselines:
            from rlphf_cli.judges import GENERAL_PREFERENCE

            prefs.append(GENERAL_PREFERENCE)
        return prefs

    def _annotator_inputs(self) -> dict:
        """What annotation verdicts depend on: the annotate section, its judge backend and templates."""
        judge = self.recipe.judge
        backend = getattr(judge, self.recipe.annotate.judge, None)
        return {**self.recipe.settings("annotate", "seed"), "templates": judge.templates,
                "backend": backend.model_dump(mode="json") if backend is not None else None}

    def _units_annotate(self) -> list[Unit]:
        units = []
        for pref in self._annotation_prefs():
            def work(pref=pref):
                from rlphf_cli.judges.annotate import annotate_rollouts

                return annotate_rollouts(self.recipe, self.run.rollouts(), [pref], self.run.path("annotations"),
                                         progress=self._unit_progress, force=True)

            inputs = {"rollouts": self.fp.get("rollouts"), "pref": pref.to_dict(), **self._annotator_inputs()}
            units.append(Unit(f"annotate/{pref.id}", pref.id, inputs, work, [self.run.annotations(pref.id)]))
        return units

    def _units_train_rm(self) -> list[Unit]:
        units = []
        prefs = [p.id for p in self._annotation_prefs()]
        for pref_id in prefs:
            inputs = {"annotations": self.fp.get(f"annotate/{pref_id}"), **self.recipe.settings("model", "train_rm", "seed")}
            units.append(Unit(f"train-rm/{pref_id}", pref_id, inputs,
                              _Job(_train_rm_job, self.recipe, pref_id, str(self.run.root), self.model_path),
                              [self.run.reward_model(pref_id)]))
        return units

    def _units_train_policy(self) -> list[Unit]:
        units = []
        for pref in self.prefs:
            inputs = {"rm": self.fp.get(f"train-rm/{pref.id}"), **self.recipe.settings("model", "data", "train_policy", "seed")}
            units.append(Unit(f"train-policy/{pref.id}", pref.id, inputs,
                              _Job(_train_policy_job, self.recipe, "soup", pref.id, str(self.run.root), self.model_path),
                              [self.run.policy(pref.id)]))
        return units

    def _units_baselines(self) -> list[Unit]:
        units = []
        for mode in (b for b in self.recipe.evaluation.baselines if b in TRAINED_BASELINES):
            if mode == "multitask":  # supervised on the annotations: no reward model, no prompt set
                inputs = {"annotations": [self.fp.get(f"annotate/{p.id}") for p in self.prefs],
                          **self.recipe.settings("model", "train_policy", "seed")}
            else:
                rm_keys = [f"train-rm/{p.id}" for p in self.prefs] if mode == "morl" else ["train-rm/general"]
                inputs = {"rms": [self.fp.get(k) for k in rm_keys], **self.recipe.settings("model", "data", "train_policy", "seed")}
            units.append(Unit(f"baselines/{mode}", mode, inputs,
                              _Job(_train_policy_job, self.recipe, mode, None, str(self.run.root), self.model_path),
                              [self.run.policy(mode)]))
        return units

    def sweep_weights(self) -> list[float]:
        return list(self.recipe.evaluation.sweep.weights) if self.recipe.evaluation.sweep else []

    def sweep_soup(self, weight: float) -> Path:
        a, b = self.sweep_prefs()
        return self.run.path("soups", f"sweep-{a.id}-{b.id}", f"w{weight:g}")

    def sweep_prefs(self) -> list[Preference]:
        return self.prefs.resolve(self.recipe.evaluation.sweep.prefs)

    def _units_merge(self) -> list[Unit]:
        from rlphf_cli.merging import merge_adapters

        params = {"rank": self.recipe.merge.rank, "density": self.recipe.merge.density, "seed": self.recipe.merge.seed}
        params = {k: v for k, v in params.items() if v is not None}
        units = []
        for combo in self.combos:
            name = combination_name(combo)
            dirs = [self.run.policy(p.id) for p in combo]
            weights = [1.0 / len(combo)] * len(combo)

            def work(dirs=dirs, weights=weights, name=name):
                merge_adapters(dirs, weights, method=self.recipe.merge.method, out_dir=self.run.soup(name), **params)
                return {"inputs": [d.name for d in dirs], "weights": weights}

            inputs = {"policies": [self.fp.get(f"train-policy/{p.id}") for p in combo], "merge": self.recipe.settings("merge")}
            units.append(Unit(f"merge/{name}", name, inputs, work, [self.run.soup(name)]))
        if self.recipe.evaluation.sweep:
            a, b = self.sweep_prefs()
            for weight in self.sweep_weights():
                dirs = [self.run.policy(a.id), self.run.policy(b.id)]

                def work(dirs=dirs, weight=weight):
                    # 'average' refuses negative weights only; the end points are single policies.
                    merge_adapters(dirs, [weight, 1.0 - weight], method="average", out_dir=self.sweep_soup(weight))
                    return {"weights": [weight, 1.0 - weight]}

                inputs = {"policies": [self.fp.get(f"train-policy/{p.id}") for p in (a, b)], "weight": weight}
                units.append(Unit(f"merge/sweep-{a.id}-{b.id}-w{weight:g}", f"sweep {weight:g}", inputs, work,
                                  [self.sweep_soup(weight)]))
        return units

    def systems(self) -> list[str]:
        """P-Soups and the recipe's baselines, in the paper's order."""
        listed = {PSOUPS, *self.recipe.evaluation.baselines}
        return [s for s in ORDER if s in listed]

    def _units_evaluate(self) -> list[Unit]:
        from rlphf_cli.data import load_prompts

        prompts = load_prompts(self.recipe.data.eval_prompts, self.recipe.data.max_eval_prompts)
        base_inputs = {**self.recipe.settings("model", "data", "generate", "seed")}
        units = []

        def add(system: str, name: str, prefs: list[str], adapter: Path | None, upstream: str | None):
            out = self.run.generations(system, name)

            def work():
                from rlphf_cli.generation import generate_file

                prefs_objs = [self.prefs.get(p) for p in prefs]
                generator = self.base_generator() if adapter is None else None
                return generate_file(self.recipe, prompts, out, prefs=prefs_objs, adapter=adapter,
                                     system=system if adapter is None else f"{system}:{name}", num_samples=1,
                                     generator=generator, progress=self._unit_progress)

            inputs = {**base_inputs, "prefs": prefs, "adapter": self.fp.get(upstream) if upstream else None}
            units.append(Unit(f"evaluate/{system}/{name}", f"{system} {name}", inputs, work, [out]))

        # The base model without a preference prompt answers the same whatever the combination:
        # generate once; judging labels the same answers with each combination.
        add(BASE, BASE_PLAIN, [], None, None)
        for combo in self.combos:
            name = combination_name(combo)
            ids = [p.id for p in combo]
            add(PSOUPS, name, ids, self.run.soup(name), f"merge/{name}")
            if PROMPTED in self.recipe.evaluation.baselines:
                add(PROMPTED, name, ids, None, None)
            for mode in (b for b in self.recipe.evaluation.baselines if b in TRAINED_BASELINES):
                add(mode, name, ids, self.run.policy(mode), f"baselines/{mode}")
        for pref in self.prefs:
            add(EXPERTS, pref.id, [pref.id], self.run.policy(pref.id), f"train-policy/{pref.id}")
            # What training adds over prompting: each expert against the base model given the same prompt.
            add(PROMPTED, pref.id, [pref.id], None, None)
        if self.recipe.evaluation.sweep:
            a, b = self.sweep_prefs()
            for weight in self.sweep_weights():
                add(SWEEP, f"w{weight:g}", [], self.sweep_soup(weight),
                    f"merge/sweep-{a.id}-{b.id}-w{weight:g}")
        return units

    def judged_pairs(self) -> list[tuple[str, str]]:
        """(system, other): every system against the base model (the paper's table); P-Soups head to
        head against every other system; the experts against the base model with their preference
        prompt (the expert check) and without any prompt."""
        others = [s for s in self.systems() if s != PSOUPS]
        pairs = [(s, BASE) for s in self.systems() if s != BASE and BASE in others]
        pairs += [(PSOUPS, s) for s in others if s != BASE]
        return pairs + [(EXPERTS, PROMPTED), (EXPERTS, BASE)]

    def _generations_for_judging(self, system: str, names: list[str]) -> list[Path]:
        # The base model's plain answers match every combination (rlphf_cli.evaluation.judging).
        if system == BASE:
            return [self.run.generations(BASE, BASE_PLAIN)]
        return [self.run.generations(system, name) for name in names]

    def _units_judge(self) -> list[Unit]:
        units = []
        for system, baseline in self.judged_pairs():
            if system == EXPERTS:
                names = [p.id for p in self.prefs]
            else:
                names = [combination_name(c) for c in self.combos]
            upstream = [f"evaluate/{s}/{n}" for s in (system, baseline)
                        for n in ([BASE_PLAIN] if s == BASE else names)]
            out = self.run.judgment(system, baseline)

            def work(system=system, baseline=baseline, names=names, out=out):
                from rlphf_cli.evaluation.judging import judge_files

                a = self._generations_for_judging(system, names)
                b = self._generations_for_judging(baseline, names)
                # Criteria: each record's own combination (the experts: their one preference).
                result = judge_files(self.recipe, a, b, None, out, progress=self._unit_progress, force=True)
                return {"win_rate": result["overall"]["win_rate"]}

            inputs = {"judge": self.recipe.settings("judge"), "generations": [self.fp.get(k) for k in upstream]}
            units.append(Unit(f"judge/{system}_vs_{baseline}", f"{system} vs {baseline}", inputs, work, [out]))
        return units

    def _units_report(self) -> list[Unit]:
        def work():
            from rlphf_cli.evaluation.report import write_report

            return write_report(self)

        inputs = {"judgments": [self.fp.get(f"judge/{s}_vs_{b}") for s, b in self.judged_pairs()],
                  "sweep": [self.fp.get(f"evaluate/{SWEEP}/w{w:g}") for w in self.sweep_weights()]}
        return [Unit("report", "report", inputs, work, [self.run.report_dir() / "report.md"])]

    # ----------------------------------------------------------------------------------------

    def _unit_progress(self, *args, **kwargs) -> None:
        self.progress("inner", *args, **kwargs)

    def stages(self) -> list[str]:
        return [s.name for s in plan(self.recipe)]

    def execute(self, only: str | None = None, from_stage: str | None = None, force: bool = False,
                prefs: list[str] | None = None) -> dict:
        stages = self.stages()
        start_at = stages.index(from_stage) if from_stage else 0
        summary: dict[str, Any] = {"stages": {}, "run_dir": str(self.run.root)}
        for index, stage in enumerate(stages):
            units = self.units(stage)
            selected = (only is None or stage == only) and index >= start_at
            redo = force and selected or (from_stage is not None and index >= start_at)
            self.progress("stage", index, len(stages), stage, len(units))
            started = time.time()
            summary["stages"][stage] = self._run_stage(stage, units, selected, redo, prefs)
            self.progress("stage-end", stage, summary["stages"][stage], time.time() - started)
        summary["report"] = str(self.run.report_dir() / "report.md")
        summary["report_summary"] = str(self.run.report_dir() / "summary.json")
        return summary

    def _run_stage(self, stage: str, units: list[Unit], selected: bool, redo: bool,
                   prefs: list[str] | None = None) -> dict:
        todo = []
        changed = 0
        keys: dict[str, str] = {}  # unit key -> fingerprint of its inputs
        for unit in units:
            key = keys[unit.key] = fingerprint(unit.inputs)
            marker = self.run.marker(unit.key) or {}
            finished = marker.get("fingerprint") == key and all(p.exists() for p in unit.outputs)
            on_disk, files = self.run.outputs_fingerprint(unit.outputs, marker.get("files"))
            if finished and marker.get("outputs") not in (None, on_disk):
                # Replaced by a stage command (with --force) since this run made it: keep it, and let
                # what depends on it see the change.
                changed += 1
                self.progress("changed", unit.key, [str(p.relative_to(self.run.root)) for p in unit.outputs])
                if self.main:
                    self.run.log_event(unit.key, "changed", outputs=[str(p) for p in unit.outputs])
            if finished and marker.get("outputs") != on_disk and self.main:
                kept = {k: v for k, v in marker.items() if k not in ("stage", "fingerprint", "time")}
                self.run.mark_done(unit.key, key, **{**kept, "outputs": on_disk, "files": files})
            # Downstream units depend on what is on disk, not only on how it was asked for.
            self.fp[unit.key] = fingerprint({"inputs": key, "outputs": on_disk})
            picked = prefs is None or unit.key.rsplit("/", 1)[-1] in prefs
            if picked and (redo or (selected and not finished)):
                todo.append(unit)
        counts = {"units": len(units), "ran": len(todo), "skipped": len(units) - len(todo), "changed": changed}
        if not todo:
            return counts
        record = self.run.stage(stage, units=[u.key for u in todo]) if self.main else contextlib.nullcontext({})
        with record as info:
            jobs = all(isinstance(u.work, _Job) for u in todo) and world_size() == 1
            for done, (unit, result) in enumerate(self._work(todo, self.recipe.parallel if jobs else 1), 1):
                key = keys[unit.key]
                on_disk, files = self.run.outputs_fingerprint(unit.outputs)
                if self.main:
                    self.run.mark_done(unit.key, key, result=_jsonable(result), outputs=on_disk, files=files)
                self.fp[unit.key] = fingerprint({"inputs": key, "outputs": on_disk})
                self.progress("unit", done, len(todo), unit.label)
            info.update(counts)
        return counts

    def _work(self, units: list[Unit], parallel: int):
        if parallel <= 1 or len(units) == 1:
            for unit in units:
                started = time.time()
                self.progress("unit-start", unit.label)
                result = unit.work() or {}
                if self.main:
                    self.run.log_event(unit.key, "done", wall_s=round(time.time() - started, 3))
                yield unit, result
            return
        # Per-preference training jobs are independent: split the cores between worker processes.
        threads = max(1, (os.cpu_count() or 1) // parallel)
        with ProcessPoolExecutor(max_workers=parallel, initializer=_worker_setup, initargs=(threads,)) as pool:
            futures = [(unit, pool.submit(unit.work.func, *unit.work.args)) for unit in units]
            for unit, future in futures:
                yield unit, future.result() or {}


@contextlib.contextmanager
def _imports_out_of_gc() -> Iterator[None]:
    """Every Trainer.train() starts with a full gc.collect() (accelerate's free_memory): with torch,
    transformers and trl imported, a walk over every module's objects, 0.25 s per trained model
    (2 of the 7.6 s of `rlphf run smoke`). The objects alive before the stages outlive them: keep
    them out of those walks while the stages run, and hand them back to the collector after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class _Job:
    """A picklable unit of work, so that `parallel: N` can run it in a worker process."""

    func: Callable
    args: tuple

    def __init__(self, func: Callable, *args: Any):
        self.func = func
        self.args = args

    def __call__(self) -> dict | None:
        return self.func(*self.args)


def _worker_setup(threads: int) -> None:
    import torch

    from rlphf_cli.training import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()


def _train_rm_job(recipe: Recipe, pref_id: str, run_root: str, model_path: str) -> dict:
    from rlphf_cli.training.reward import train_reward_model

    run = RunDir(run_root)
    return train_reward_model(recipe, pref_id, run.annotations(pref_id), run.reward_model(pref_id), model=model_path,
                              force=True)


def _train_policy_job(recipe: Recipe, mode: str, pref_id: str | None, run_root: str, model_path: str) -> dict:
    from rlphf_cli.training.policy import train_policy

    run = RunDir(run_root)
    name = pref_id if mode == "soup" else mode
    return train_policy(recipe, pref=pref_id, mode=mode, model=model_path, out_dir=run.policy(name),
                        run_dir=run.root, force=True)


def _jsonable(result: Any) -> Any:
    try:
        json.dumps(result)
        return result
    except TypeError:
        return str(result)


def check_selection(recipe: Recipe, only: str | None = None, from_stage: str | None = None,
                    prefs: str | None = None) -> list[str] | None:
    """Validate --only / --from / --prefs (and what a distributed launch can run); return the ids --pref picks."""
    stages = [stage.name for stage in plan(recipe)]
    for name in (only, from_stage):
        if name is not None and name not in stages:
            raise InputError(f"unknown stage '{name}'{did_you_mean(name, stages)}")
    if world_size() > 1 and only not in TRAINING_STAGES:
        # Other stages would run once per process, each writing the same files.
        raise InputError(f"under a distributed launch ({world_size()} processes) rlphf run trains only: add --only "
                         f"{', '.join(s for s in TRAINING_STAGES if s in stages)}; run the other stages in one process")
    if prefs is None:
        return None
    if only not in PER_PREFERENCE_STAGES:
        raise InputError(f"--prefs picks units of one per-preference stage: add --only {' or '.join(PER_PREFERENCE_STAGES)}")
    from rlphf_cli.training.reward import resolve_rm_name

    ids = [resolve_rm_name(recipe, n)[0] for n in prefs.split(",") if n.strip()]
    if not ids:
        raise InputError("--prefs: no preference given")
    return ids


def run_pipeline(recipe: Recipe, *, only: str | None = None, from_stage: str | None = None, force: bool = False,
                 prefs: str | None = None, progress: Progress | None = None) -> dict:
    """Run (or resume) every stage of a recipe; return a summary with the report path. `prefs` ('P2A',
    'concise,friendly') restricts the --only stage to those preferences' units (one job-array task each)."""
    ids = check_selection(recipe, only, from_stage, prefs)
    builtin = builtin_model(recipe.model.name)
    with _imports_out_of_gc(), torch_threads(builtin.threads if builtin else None):
        return Pipeline(recipe, progress).execute(only=only, from_stage=from_stage, force=force, prefs=ids)
