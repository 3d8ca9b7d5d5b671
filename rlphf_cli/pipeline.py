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
from rlphf_cli.runs import RunDir, atomic_write_text, fingerprint, read_jsonl

STAGE_NAMES = ("tiny-model", "rollouts", "annotate", "train-rm", "train-policy", "baselines", "merge",
               "evaluate", "judge", "report")
TRAINED_BASELINES = ("morl", "rlhf")
SWEEP_SYSTEM = "sweep"
BASE_PLAIN = "plain"  # generations/base/plain.jsonl: the base model, no preference prompt
EXPERTS_SYSTEM = "experts"


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
        Stage("train-rm", f"one LoRA reward model (r={recipe.train_rm.lora.r}) per preference: {ids}"),
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
        Stage("judge", f"psoups, experts and baselines against {', '.join(baselines)} "
              f"with the '{recipe.judge.backend}' judge"),
        Stage("report", "report.md with win-rate tables, reward-model accuracies, curves, sweep and costs"),
    ]
    return stages


# --------------------------------------------------------------------------------------------
# Units of each stage


class Pipeline:
    def __init__(self, recipe: Recipe, progress: Progress | None = None):
        self.recipe = recipe
        self.run = RunDir.open(recipe.resolved_run_dir(), recipe)
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

            self._base_generator = Generator.load(self.recipe, system="base")
        return self._base_generator

    def _section(self, *names: str) -> dict:
        dumped = self.recipe.model_dump(mode="json")
        return {name: dumped[name] for name in names}

    def _combo_prefs(self, combo: tuple[Preference, ...]) -> list[str]:
        return [p.id for p in combo]

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
            return generate_file(self.recipe, prompts, self.run.rollouts(), prefs=(), system="base",
                                 num_samples=self.recipe.annotate.num_samples, generator=self.base_generator(),
                                 progress=self._unit_progress)

        inputs = {**self._section("model", "data", "generate", "seed"), "num_samples": self.recipe.annotate.num_samples}
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
        return {**self._section("annotate", "seed"), "templates": judge.templates,
                "backend": backend.model_dump(mode="json") if backend is not None else None}

    def _units_annotate(self) -> list[Unit]:
        units = []
        for pref in self._annotation_prefs():
            def work(pref=pref):
                from rlphf_cli.judges.annotate import annotate_rollouts

                return annotate_rollouts(self.recipe, self.run.rollouts(), [pref], self.run.path("annotations"),
                                         progress=self._unit_progress)

            inputs = {"rollouts": self.fp.get("rollouts"), "pref": pref.to_dict(), **self._annotator_inputs()}
            units.append(Unit(f"annotate/{pref.id}", pref.id, inputs, work, [self.run.annotations(pref.id)]))
        return units

    def _units_train_rm(self) -> list[Unit]:
        units = []
        prefs = [p.id for p in self._annotation_prefs()]
        for pref_id in prefs:
            inputs = {"annotations": self.fp.get(f"annotate/{pref_id}"), **self._section("model", "train_rm", "seed")}
            units.append(Unit(f"train-rm/{pref_id}", pref_id, inputs,
                              _Job(_train_rm_job, self.recipe, pref_id, str(self.run.root), self.model_path),
                              [self.run.reward_model(pref_id) / "metrics.json"]))
        return units

    def _units_train_policy(self) -> list[Unit]:
        units = []
        for pref in self.prefs:
            inputs = {"rm": self.fp.get(f"train-rm/{pref.id}"), **self._section("model", "data", "train_policy", "seed")}
            units.append(Unit(f"train-policy/{pref.id}", pref.id, inputs,
                              _Job(_train_policy_job, self.recipe, "soup", pref.id, str(self.run.root), self.model_path),
                              [self.run.policy(pref.id) / "adapter_model.safetensors"]))
        return units

    def _units_baselines(self) -> list[Unit]:
        units = []
        for mode in (b for b in self.recipe.evaluation.baselines if b in TRAINED_BASELINES):
            rm_keys = [f"train-rm/{p.id}" for p in self.prefs] if mode == "morl" else ["train-rm/general"]
            inputs = {"rms": [self.fp.get(k) for k in rm_keys], **self._section("model", "data", "train_policy", "seed")}
            units.append(Unit(f"baselines/{mode}", mode, inputs,
                              _Job(_train_policy_job, self.recipe, mode, None, str(self.run.root), self.model_path),
                              [self.run.policy(mode) / "adapter_model.safetensors"]))
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

            inputs = {"policies": [self.fp.get(f"train-policy/{p.id}") for p in combo], "merge": self._section("merge")}
            units.append(Unit(f"merge/{name}", name, inputs, work, [self.run.soup(name) / "soup.json"]))
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
                                  [self.sweep_soup(weight) / "soup.json"]))
        return units

    def systems(self) -> list[str]:
        return ["psoups", *self.recipe.evaluation.baselines]

    def _units_evaluate(self) -> list[Unit]:
        from rlphf_cli.data import load_prompts

        prompts = load_prompts(self.recipe.data.eval_prompts, self.recipe.data.max_eval_prompts)
        base_inputs = {**self._section("model", "data", "generate", "seed")}
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
        add("base", BASE_PLAIN, [], None, None)
        for combo in self.combos:
            name = combination_name(combo)
            ids = [p.id for p in combo]
            add("psoups", name, ids, self.run.soup(name), f"merge/{name}")
            if "prompted" in self.recipe.evaluation.baselines:
                add("prompted", name, ids, None, None)
            for mode in (b for b in self.recipe.evaluation.baselines if b in TRAINED_BASELINES):
                add(mode, name, ids, self.run.policy(mode), f"baselines/{mode}")
        for pref in self.prefs:
            add(EXPERTS_SYSTEM, pref.id, [pref.id], self.run.policy(pref.id), f"train-policy/{pref.id}")
        if self.recipe.evaluation.sweep:
            a, b = self.sweep_prefs()
            for weight in self.sweep_weights():
                add(SWEEP_SYSTEM, f"w{weight:g}", [], self.sweep_soup(weight),
                    f"merge/sweep-{a.id}-{b.id}-w{weight:g}")
        return units

    def judged_pairs(self) -> list[tuple[str, str]]:
        """(system, baseline): every system against every baseline, and the experts against base."""
        baselines = self.recipe.evaluation.baselines
        pairs = [(system, baseline) for system in self.systems() for baseline in baselines if system != baseline]
        if "base" in baselines:
            pairs.append((EXPERTS_SYSTEM, "base"))
        return pairs

    def _generations_for_judging(self, system: str, names: list[str]) -> list[Path]:
        if system != "base":
            return [self.run.generations(system, name) for name in names]
        # Label the base answers with each combination so they match the other side by (id, combo).
        plain = read_jsonl(self.run.generations("base", BASE_PLAIN))
        paths = []
        for name in names:
            path = self.run.path("judgments", ".base", f"{name}.jsonl")
            records = [{**r, "combo": name} for r in plain]
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            paths.append(path)
        return paths

    def _units_judge(self) -> list[Unit]:
        units = []
        for system, baseline in self.judged_pairs():
            if system == EXPERTS_SYSTEM:
                names = [p.id for p in self.prefs]
            else:
                names = [combination_name(c) for c in self.combos]
            upstream = [f"evaluate/{s}/{n}" for s in (system, baseline)
                        for n in ([BASE_PLAIN] if s == "base" else names)]
            out = self.run.judgment(system, baseline)

            def work(system=system, baseline=baseline, names=names, out=out):
                from rlphf_cli.evaluation.judging import judge_files

                a = self._generations_for_judging(system, names)
                b = self._generations_for_judging(baseline, names)
                # Criteria: each record's own combination (the experts: their one preference).
                result = judge_files(self.recipe, a, b, None, out, progress=self._unit_progress)
                return {"win_rate": result["overall"]["win_rate"]}

            inputs = {"judge": self._section("judge"), "generations": [self.fp.get(k) for k in upstream]}
            units.append(Unit(f"judge/{system}_vs_{baseline}", f"{system} vs {baseline}", inputs, work, [out]))
        return units

    def _units_report(self) -> list[Unit]:
        def work():
            from rlphf_cli.evaluation.report import write_report

            return write_report(self)

        inputs = {"judgments": [self.fp.get(f"judge/{s}_vs_{b}") for s, b in self.judged_pairs()],
                  "sweep": [self.fp.get(f"evaluate/{SWEEP_SYSTEM}/w{w:g}") for w in self.sweep_weights()]}
        return [Unit("report", "report", inputs, work, [self.run.report_dir() / "report.md"])]

    # ----------------------------------------------------------------------------------------

    def _unit_progress(self, *args, **kwargs) -> None:
        self.progress("inner", *args, **kwargs)

    def stages(self) -> list[str]:
        return [s.name for s in plan(self.recipe)]

    def execute(self, only: str | None = None, from_stage: str | None = None, force: bool = False) -> dict:
        stages = self.stages()
        start_at = stages.index(from_stage) if from_stage else 0
        summary: dict[str, Any] = {"stages": {}, "run_dir": str(self.run.root)}
        for index, stage in enumerate(stages):
            units = self.units(stage)
            selected = (only is None or stage == only) and index >= start_at
            redo = force and selected or (from_stage is not None and index >= start_at)
            self.progress("stage", index, len(stages), stage, len(units))
            started = time.time()
            summary["stages"][stage] = self._run_stage(stage, units, selected, redo)
            self.progress("stage-end", stage, summary["stages"][stage], time.time() - started)
        summary["report"] = str(self.run.report_dir() / "report.md")
        summary["report_summary"] = str(self.run.report_dir() / "summary.json")
        return summary

    def _run_stage(self, stage: str, units: list[Unit], selected: bool, redo: bool) -> dict:
        todo = []
        for unit in units:
            key = fingerprint(unit.inputs)
            self.fp[unit.key] = key
            finished = self.run.is_done(unit.key, key) and all(p.exists() for p in unit.outputs)
            if redo or (selected and not finished):
                todo.append(unit)
        counts = {"units": len(units), "ran": len(todo), "skipped": len(units) - len(todo)}
        if not todo:
            return counts
        with self.run.stage(stage, units=[u.key for u in todo]) as info:
            parallel = self.recipe.parallel if all(isinstance(u.work, _Job) for u in todo) else 1
            for done, (unit, result) in enumerate(self._work(todo, parallel), 1):
                self.run.mark_done(unit.key, self.fp[unit.key], result=_jsonable(result))
                self.progress("unit", done, len(todo), unit.label)
            info.update(counts)
        return counts

    def _work(self, units: list[Unit], parallel: int):
        if parallel <= 1 or len(units) == 1:
            for unit in units:
                started = time.time()
                self.progress("unit-start", unit.label)
                result = unit.work() or {}
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
    return train_reward_model(recipe, pref_id, run.annotations(pref_id), run.reward_model(pref_id), model=model_path)


def _train_policy_job(recipe: Recipe, mode: str, pref_id: str | None, run_root: str, model_path: str) -> dict:
    from rlphf_cli.training.policy import train_policy

    run = RunDir(run_root)
    name = pref_id if mode == "soup" else mode
    return train_policy(recipe, pref=pref_id, mode=mode, model=model_path, out_dir=run.policy(name),
                        run_dir=run.root)


def _jsonable(result: Any) -> Any:
    import json

    try:
        json.dumps(result)
        return result
    except TypeError:
        return str(result)


def run_pipeline(recipe: Recipe, *, only: str | None = None, from_stage: str | None = None, force: bool = False,
                 progress: Progress | None = None) -> dict:
    """Run (or resume) every stage of a recipe; return a summary with the report path."""
    stages = [stage.name for stage in plan(recipe)]
    for name in (only, from_stage):
        if name is not None and name not in stages:
            raise InputError(f"unknown stage '{name}'{did_you_mean(name, stages)}")
    builtin = builtin_model(recipe.model.name)
    with _imports_out_of_gc(), torch_threads(builtin.threads if builtin else None):
        return Pipeline(recipe, progress).execute(only=only, from_stage=from_stage, force=force)


def load_generations(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []
