"""`rlphf run`: the stages of Personalized Soups in order, resumable.

Each stage runs through the same library functions as the commands. A stage is made of units
(one per preference, combination or system); every unit leaves a marker holding the fingerprint
of its inputs (the recipe sections it reads and the fingerprints of the units it depends on), so a
rerun skips finished units whose inputs did not change and recomputes everything downstream of a
change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlphf_cli import jobs
from rlphf_cli.errors import InputError, did_you_mean
from rlphf_cli.judges.cost import Budget, RequestPlan
from rlphf_cli.models import builtin_model, torch_threads
from rlphf_cli.preferences import Preference, combination_name
from rlphf_cli.recipe import Recipe
from rlphf_cli.runs import RunDir, fingerprint
from rlphf_cli.specs import (
    AnnotateJob,
    GenerateJob,
    JudgeJob,
    Member,
    MergeJob,
    MergeSpec,
    PolicyJob,
    PromptSet,
    RewardModelJob,
    Weights,
)
from rlphf_cli.specs import record as spec_record
from rlphf_cli.systems import (
    BASE,
    BASE_PLAIN,
    EXPERTS,
    ORDER,
    PARETO_METHODS,
    PROMPTED,
    PSOUPS,
    PSOUPS_DECODING,
    SWEEP,
    TRAINED_BASELINES,
)
from rlphf_cli.training import is_main_process, world_size

STAGE_NAMES = ("tiny-model", "rollouts", "annotate", "train-rm", "train-policy", "baselines", "merge",
               "evaluate", "pareto", "judge", "report")
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
    """One resumable piece of work inside a stage: its spec (everything the work reads), the units
    it depends on, the work and its outputs. Its fingerprint is the spec's plus its upstream units'."""

    key: str  # marker name, e.g. 'train-rm/P2A'
    label: str
    spec: Any  # a job spec of rlphf_cli.specs (or plain data for the report)
    upstream: list[str]  # keys of the units whose outputs it reads
    work: Callable[[], dict | None]
    outputs: list[Path] = field(default_factory=list)


# A progress sink gets ("stage", index, total, name, n_units), ("unit-start", label, index, n_todo),
# ("unit", done, n_todo, label), ("inner", done, total, what: "steps" / "prompts" / "verdicts") and
# ("stage-end", name, counts, seconds).
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
    ]
    pareto = recipe.evaluation.pareto
    if pareto:
        scored = ("scored on both rubric measures" if recipe.judge.backend == "rubric" else
                  f"judged against the base model's answers on both criteria by the '{recipe.judge.backend}' judge")
        stages.append(Stage("pareto", f"{'/'.join(pareto.prefs)} at weights {pareto.weights}: parameter soups, "
                            f"decoding-time mixes and prompting alone, {scored}"))
    stages += [
        Stage("judge", f"with the '{recipe.judge.backend}' judge: every system against base, P-Soups head to head "
              "against each other system, each expert against the base model given its preference prompt"),
        Stage("report", "report.md with win-rate tables, reward-model accuracies, curves, sweep and costs"),
    ]
    return stages


# --------------------------------------------------------------------------------------------
# Units of each stage


class Pipeline:
    """The units of every stage of a recipe, built once (every check runs here, before any work)."""

    def __init__(self, recipe: Recipe, progress: Progress | None = None):
        self.recipe = recipe
        # Under a distributed launch only the main process writes the run's records (recipe, events, markers).
        self.main = is_main_process()
        self.record = jobs.run_record(recipe)
        self.run = RunDir(recipe.resolved_run_dir())
        self.prefs = recipe.preference_set()
        self.combos = self.prefs.combinations()
        self.progress = progress or _quiet
        self.fp: dict[str, str] = {}  # unit key -> fingerprint, for downstream units
        self.model = jobs.model_spec(recipe)
        self.budget = Budget(recipe.judge.max_cost)  # one spending limit for every judge of the run
        self._base_generator = None
        self._units = {stage: getattr(self, "_units_" + stage.replace("-", "_"))() for stage in self.stages()}

    def base_generator(self, job: GenerateJob):
        """The base model, loaded once for every unit that decodes without an adapter."""
        if self._base_generator is None:
            from rlphf_cli.generation import Generator

            self._base_generator = Generator.for_job(job)
        return self._base_generator

    def units(self, stage: str) -> list[Unit]:
        return self._units[stage]

    def _units_tiny_model(self) -> list[Unit]:
        return [Unit("tiny-model", self.model.name, self.model, [], lambda: {"path": self.model.path()})]

    def _units_rollouts(self) -> list[Unit]:
        recipe = self.recipe
        count, _ = jobs.sample_count(recipe, recipe.annotate.num_samples,
                                     requested_by=f"annotate.num_samples ({recipe.origin('annotate.num_samples')})")
        job = jobs.generate_job(recipe, self.run.rollouts(), system=BASE, num_samples=count,
                                prompts=PromptSet(recipe.data.train_prompts, recipe.data.max_train_prompts))
        return [Unit("rollouts", "rollouts", job, [], self._generate(job), [job.out])]

    def _generate(self, job: GenerateJob) -> Callable[[], dict]:
        def work():
            from rlphf_cli.generation import generate_file

            generator = None if job.weights.members else self.base_generator(job)
            prompts = self._inner("prompts")
            return generate_file(job, generator=generator,
                                 progress=lambda _label, done, total, _tokens: prompts(done, total))

        return work

    def annotation_ids(self) -> list[str]:
        """The annotated preferences, and the RLHF baseline's general criterion when it is trained."""
        return [p.id for p in self.prefs] + ([jobs.GENERAL] if "rlhf" in self.recipe.evaluation.baselines else [])

    def _units_annotate(self) -> list[Unit]:
        units = []
        for pref_id in self.annotation_ids():
            job = jobs.annotate_job(self.recipe, prefs=[pref_id], rollouts=self.run.rollouts(),
                                    out_dir=self.run.path("annotations"))

            def work(job=job):
                from rlphf_cli.judges.annotate import annotate_rollouts

                return annotate_rollouts(job, progress=self._inner("verdicts"), force=True, budget=self.budget)

            units.append(Unit(f"annotate/{pref_id}", pref_id, job, ["rollouts"], work, [self.run.annotations(pref_id)]))
        return units

    def _units_train_rm(self) -> list[Unit]:
        return [Unit(f"train-rm/{job.pref_id}", job.pref_id, job, [f"annotate/{job.pref_id}"],
                     _Job(_train_rm_job, job), [job.out])
                for job in jobs.reward_model_jobs(self.recipe, self.annotation_ids())]

    def _policy_unit(self, key: str, label: str, job: PolicyJob) -> Unit:
        upstream = ([f"train-rm/{pref_id}" for pref_id, _, _ in job.reward_models]
                    + [f"annotate/{pref_id}" for pref_id, _, _ in job.annotations])
        return Unit(key, label, job, upstream, _Job(_train_policy_job, job), [job.out])

    def _units_train_policy(self) -> list[Unit]:
        return [self._policy_unit(f"train-policy/{job.name}", job.name, job)
                for job in jobs.policy_jobs(self.recipe, "all", mode="soup")]

    def _units_baselines(self) -> list[Unit]:
        return [self._policy_unit(f"baselines/{mode}", mode, jobs.policy_jobs(self.recipe, mode=mode)[0])
                for mode in self.recipe.evaluation.baselines if mode in TRAINED_BASELINES]

    def sweep_weights(self) -> list[float]:
        return list(self.recipe.evaluation.sweep.weights) if self.recipe.evaluation.sweep else []

    def sweep_soup(self, weight: float) -> Path:
        a, b = self.sweep_prefs()
        return self.run.path("soups", f"sweep-{a.id}-{b.id}", f"w{weight:g}")

    def sweep_prefs(self) -> list[Preference]:
        return self.prefs.resolve(self.recipe.evaluation.sweep.prefs)

    def _merge_unit(self, key: str, label: str, job: MergeJob, upstream: list[str]) -> Unit:
        def work():
            from rlphf_cli.merging import merge_adapters

            merge_adapters(job.inputs, list(job.weights), job.merge, out_dir=job.out)
            return {"inputs": [d.name for d in job.inputs], "weights": list(job.weights)}

        return Unit(key, label, job, upstream, work, [job.out])

    def _units_merge(self) -> list[Unit]:
        merge = jobs.merge_spec(self.recipe)
        units = []
        for combo in self.combos:
            name = combination_name(combo)
            job = MergeJob(inputs=tuple(self.run.policy(p.id) for p in combo), weights=(1.0 / len(combo),) * len(combo),
                           out=self.run.soup(name), merge=merge)
            units.append(self._merge_unit(f"merge/{name}", name, job, [f"train-policy/{p.id}" for p in combo]))
        if self.recipe.evaluation.sweep:
            a, b = self.sweep_prefs()
            for weight in self.sweep_weights():
                # 'average' refuses negative weights only; the end points are single policies.
                job = MergeJob(inputs=(self.run.policy(a.id), self.run.policy(b.id)), weights=(weight, 1.0 - weight),
                               out=self.sweep_soup(weight), merge=MergeSpec("average"))
                units.append(self._merge_unit(f"merge/sweep-{a.id}-{b.id}-w{weight:g}", f"sweep {weight:g}", job,
                                              [f"train-policy/{a.id}", f"train-policy/{b.id}"]))
        return units

    def systems(self) -> list[str]:
        """P-Soups and the recipe's baselines, in the paper's order."""
        listed = {PSOUPS, *self.recipe.evaluation.baselines}
        return [s for s in ORDER if s in listed]

    def _units_evaluate(self) -> list[Unit]:
        recipe = self.recipe
        prompts = PromptSet(recipe.data.eval_prompts, recipe.data.max_eval_prompts)
        units = []

        def add(system: str, name: str, prefs: list[Preference], adapter: Path | None, upstream: str | None):
            weights = Weights((Member(adapter, name),)) if adapter is not None else Weights()
            job = jobs.generate_job(recipe, self.run.generations(system, name), prompts=prompts, weights_=weights,
                                    prefs=prefs, system=system if adapter is None else f"{system}:{name}")
            units.append(Unit(f"evaluate/{system}/{name}", f"{system} {name}", job,
                              [upstream] if upstream else [], self._generate(job), [job.out]))

        # The base model without a preference prompt answers the same whatever the combination:
        # generate once; judging labels the same answers with each combination.
        add(BASE, BASE_PLAIN, [], None, None)
        for combo in self.combos:
            name = combination_name(combo)
            add(PSOUPS, name, list(combo), self.run.soup(name), f"merge/{name}")
            if PSOUPS_DECODING in recipe.evaluation.baselines:
                # The combination's experts, not merged: mixed at every step (equal weights, as the soup).
                members = tuple(Member(self.run.policy(p.id), p.id, 1 / len(combo)) for p in combo)
                weights = Weights(members, jobs.merge_spec(recipe), "logits")
                job = jobs.generate_job(recipe, self.run.generations(PSOUPS_DECODING, name), prompts=prompts,
                                        weights_=weights, prefs=list(combo), system=f"{PSOUPS_DECODING}:{name}")
                units.append(Unit(f"evaluate/{PSOUPS_DECODING}/{name}", f"{PSOUPS_DECODING} {name}", job,
                                  [f"train-policy/{p.id}" for p in combo], self._generate(job), [job.out]))
            if PROMPTED in recipe.evaluation.baselines:
                add(PROMPTED, name, list(combo), None, None)
            for mode in (b for b in recipe.evaluation.baselines if b in TRAINED_BASELINES):
                add(mode, name, list(combo), self.run.policy(mode), f"baselines/{mode}")
        for pref in self.prefs:
            add(EXPERTS, pref.id, [pref], self.run.policy(pref.id), f"train-policy/{pref.id}")
            # What training adds over prompting: each expert against the base model given the same prompt.
            add(PROMPTED, pref.id, [pref], None, None)
        if recipe.evaluation.sweep:
            a, b = self.sweep_prefs()
            for weight in self.sweep_weights():
                add(SWEEP, f"w{weight:g}", [], self.sweep_soup(weight), f"merge/sweep-{a.id}-{b.id}-w{weight:g}")
        return units

    def pareto_prefs(self) -> list[Preference]:
        from rlphf_cli.judges.rubric import has_measure

        chosen = self.prefs.resolve(self.recipe.evaluation.pareto.prefs)
        if chosen[0].dimension == chosen[1].dimension:
            raise InputError(f"evaluation.pareto.prefs: {chosen[0].id} and {chosen[1].id} are both of dimension "
                             f"{chosen[0].dimension}; name one preference of each of two dimensions")
        for pref in chosen:
            if not self.pareto_judged() and not has_measure(pref):
                raise InputError(f"evaluation.pareto.prefs: {pref.id} has no rubric measure to score the front on")
        return chosen

    def pareto_judged(self) -> bool:
        """Scored by the run's LLM judge (win rate against the base model's answers on each of the two
        criteria) rather than by the rubric's measures."""
        return self.recipe.evaluation.pareto is not None and self.recipe.judge.backend != "rubric"

    def pareto_judgment(self, method: str, weight: float) -> Path:
        return self.run.judgment(f"{method}-w{weight:g}", BASE)

    def pareto_outputs(self) -> dict[str, list[tuple[float, Path]]]:
        """method -> [(weight on the first preference, generations file)]."""
        weights = self.recipe.evaluation.pareto.weights if self.recipe.evaluation.pareto else []
        return {method: [(w, self.run.generations(method, f"w{w:g}")) for w in weights] for method in PARETO_METHODS}

    @staticmethod
    def pareto_unit(method: str, weight: float) -> str:
        return f"pareto/{method}/w{weight:g}"

    @staticmethod
    def pareto_judge_unit(method: str, weight: float) -> str:
        return f"judge/{method}-w{weight:g}_vs_{BASE}"

    def _units_pareto(self) -> list[Unit]:
        recipe = self.recipe
        a, b = self.pareto_prefs()
        prompts = PromptSet(recipe.data.eval_prompts, recipe.data.max_eval_prompts)
        units = []
        for method, points in self.pareto_outputs().items():
            for weight, out in points:
                if method == "pareto-prompted":
                    # No weights in a prompt: the first preference's prompt, both, or the second's.
                    prefs = [a] if weight >= 0.75 else [b] if weight <= 0.25 else [a, b]
                    weights, upstream = Weights(), []
                else:
                    prefs = []  # like the sweep: what the weights do, without a preference prompt
                    members = (Member(self.run.policy(a.id), a.id, weight), Member(self.run.policy(b.id), b.id, 1 - weight))
                    compose = "logits" if method == "pareto-logits" else "params"
                    weights = Weights(members, MergeSpec("average"), compose)
                    upstream = [f"train-policy/{a.id}", f"train-policy/{b.id}"]
                job = jobs.generate_job(recipe, out, prompts=prompts, weights_=weights, prefs=prefs,
                                        system=f"{method}:w{weight:g}")
                units.append(Unit(self.pareto_unit(method, weight), f"{method} w{weight:g}", job, upstream,
                                  self._generate(job), [job.out]))
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
            names = [p.id for p in self.prefs] if system == EXPERTS else [combination_name(c) for c in self.combos]
            upstream = [f"evaluate/{s}/{n}" for s in (system, baseline) for n in ([BASE_PLAIN] if s == BASE else names)]
            # Criteria: each record's own combination (the experts: their one preference).
            job = jobs.judge_job(self.recipe, self._generations_for_judging(system, names),
                                 self._generations_for_judging(baseline, names), out=self.run.judgment(system, baseline))
            units.append(Unit(f"judge/{system}_vs_{baseline}", f"{system} vs {baseline}", job, upstream,
                              self._judge(job), [job.out]))
        if self.pareto_judged():
            # Each point of each front against one fixed reference, the base model's plain answers, on
            # both criteria: win rates on a common scale.
            criteria_ = [p.id for p in self.pareto_prefs()]
            for method, points in self.pareto_outputs().items():
                for weight, path in points:
                    job = jobs.judge_job(self.recipe, [path], [self.run.generations(BASE, BASE_PLAIN)],
                                         criteria_=criteria_, out=self.pareto_judgment(method, weight))
                    units.append(Unit(self.pareto_judge_unit(method, weight), f"{method} w{weight:g} vs {BASE}",
                                      job, [self.pareto_unit(method, weight), f"evaluate/{BASE}/{BASE_PLAIN}"],
                                      self._judge(job), [job.out]))
        return units

    def _judge(self, job) -> Callable[[], dict]:
        def work():
            from rlphf_cli.evaluation.judging import judge_files

            result = judge_files(job, progress=self._inner("verdicts"), force=True, budget=self.budget)
            return {"win_rate": result["overall"]["win_rate"]}

        return work

    def _units_report(self) -> list[Unit]:
        def work():
            from rlphf_cli.evaluation.report import write_report

            return write_report(self)

        points = [(m, w) for m, at in self.pareto_outputs().items() for w, _ in at]
        pareto_judged = [self.pareto_judge_unit(m, w) for m, w in points] if self.pareto_judged() else []
        upstream = ([f"judge/{s}_vs_{b}" for s, b in self.judged_pairs()] + pareto_judged
                    + [f"evaluate/{SWEEP}/w{w:g}" for w in self.sweep_weights()]
                    + [self.pareto_unit(m, w) for m, w in points])
        return [Unit("report", "report", None, upstream, work, [self.run.report_dir() / "report.md"])]

    def judge_plans(self) -> dict[str, RequestPlan | str | None]:
        """Per judging stage (annotate, judge): the requests its units would send after the cache, with
        their tokens and cost, from each unit's own job (None: its judge sends no paid request; a
        text: why they cannot be counted yet). An input not made yet is stood in for by what the unit
        that makes it will write, every response at its longest."""
        import tempfile

        from rlphf_cli.errors import RlphfError
        from rlphf_cli.evaluation.judging import plan_judgment
        from rlphf_cli.judges import JUDGES
        from rlphf_cli.judges.annotate import plan_annotation

        makers = {unit.spec.out: unit.spec for stage in ("rollouts", "evaluate", "pareto") if stage in self._units
                  for unit in self.units(stage)}
        plans: dict[str, RequestPlan | str | None] = {}
        with tempfile.TemporaryDirectory() as scratch:
            for stage, planner in (("annotate", plan_annotation), ("judge", plan_judgment)):
                plans[stage] = None
                try:
                    for unit in self.units(stage):
                        if not JUDGES.get(unit.spec.judge.backend).priced:
                            continue
                        job, estimated = _with_stand_ins(unit.spec, makers, Path(scratch) / unit.key.replace("/", "_"))
                        plan = planner(job)
                        plan.estimated = estimated
                        plans[stage] = plan if plans[stage] is None else plans[stage] + plan
                except RlphfError as exc:
                    plans[stage] = f"not counted: {exc}"
        return plans

    def fingerprints(self) -> dict[str, str]:
        """Every unit's inputs fingerprint, from the specs alone (as if every upstream unit's outputs
        stood as they are): what decides which units a change of the recipe reruns."""
        found: dict[str, str] = {}
        saved, self.fp = self.fp, found
        try:
            for stage in self.stages():
                for unit in self.units(stage):
                    found[unit.key] = self.fingerprint(unit)
        finally:
            self.fp = saved
        return found

    def fingerprint(self, unit: Unit) -> str:
        """What decides whether a unit is up to date: its spec, and its upstream units' fingerprints
        (which cover what they wrote)."""
        return fingerprint({"spec": spec_record(unit.spec), "upstream": [self.fp.get(k) for k in unit.upstream]})

    # ----------------------------------------------------------------------------------------

    def _inner(self, what: str) -> Callable[..., None]:
        """A library's progress(done, total[, info]) callback, shown under the running unit as
        `what: done/total` (training steps, prompts generated, verdicts)."""
        def report(done, total=None, *_info) -> None:
            self.progress("inner", done, total, what)

        return report

    def stages(self) -> list[str]:
        return [s.name for s in plan(self.recipe)]

    def execute(self, only: str | None = None, from_stage: str | None = None, force: bool = False,
                prefs: list[str] | None = None, keys: set[str] | None = None) -> dict:
        """Run the stages; `keys`: only these units (a stage command making its missing inputs), which leaves the
        run's recipe.yaml as it is."""
        if self.main:  # the run's recipe.yaml, env.json and this command's event, before any work
            self.run.begin(self.record, run_recipe=keys is None)
        stages = self.stages()
        start_at = stages.index(from_stage) if from_stage else 0
        summary: dict[str, Any] = {"stages": {}, "run_dir": str(self.run.root)}
        # With `keys`, the stages after the last one that holds a key are not looked at, and the others
        # are walked (their fingerprints feed the keys') without a line each.
        shown = [s for s in stages if keys is None or any(u.key in keys for u in self.units(s))]
        for index, stage in enumerate(stages[:stages.index(shown[-1]) + 1] if shown else []):
            units = self.units(stage)
            selected = (only is None or stage == only) and index >= start_at
            redo = force and selected or (from_stage is not None and index >= start_at)
            progress = self.progress if stage in shown else _quiet
            progress("stage", shown.index(stage) if stage in shown else 0, len(shown), stage, len(units))
            started = time.time()
            summary["stages"][stage] = self._run_stage(stage, units, selected, redo, prefs, keys)
            progress("stage-end", stage, summary["stages"][stage], time.time() - started)
        summary["report"] = str(self.run.report_dir() / "report.md")
        summary["report_summary"] = str(self.run.report_dir() / "summary.json")
        return summary

    def _run_stage(self, stage: str, units: list[Unit], selected: bool, redo: bool,
                   prefs: list[str] | None = None, keys_wanted: set[str] | None = None) -> dict:
        todo = []
        changed = 0
        keys: dict[str, str] = {}  # unit key -> fingerprint of its inputs
        for unit in units:
            key = keys[unit.key] = self.fingerprint(unit)
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
            picked = ((prefs is None or unit.key.rsplit("/", 1)[-1] in prefs)
                      and (keys_wanted is None or unit.key in keys_wanted))
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
            for index, unit in enumerate(units, 1):
                started = time.time()
                self.progress("unit-start", unit.label, index, len(units))
                # A training job in this process reports its steps (a worker process's cannot).
                work = functools.partial(unit.work, progress=self._inner("steps")) if isinstance(unit.work, _Job) \
                    else unit.work
                result = work() or {}
                if self.main:
                    self.run.log_event(unit.key, "done", wall_s=round(time.time() - started, 3))
                yield unit, result
            return
        # Per-preference training jobs are independent: split the cores between worker processes.
        threads = max(1, (os.cpu_count() or 1) // parallel)
        self.progress("unit-start", f"{', '.join(u.label for u in units)}: {parallel} at a time", 1, 1)
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

    def __call__(self, **kwargs: Any) -> dict | None:
        return self.func(*self.args, **kwargs)


def _worker_setup(threads: int) -> None:
    import torch

    from rlphf_cli.training import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()


def _train_rm_job(job: RewardModelJob, progress: Progress | None = None) -> dict:
    from rlphf_cli.training.reward import train_reward_model

    return train_reward_model(job, force=True, progress=progress)


def _train_policy_job(job: PolicyJob, progress: Progress | None = None) -> dict:
    from rlphf_cli.training.policy import train_policy

    return train_policy(job, force=True, progress=progress)


def _with_stand_ins(job: AnnotateJob | JudgeJob, makers: dict[Path, GenerateJob], scratch: Path):
    """`job` reading stand-ins (rlphf_cli.generation.stand_in_file) for the inputs not made yet, and
    whether it does."""
    from rlphf_cli.data import HUB_PREFIX
    from rlphf_cli.generation import stand_in_file

    inputs = [job.rollouts] if isinstance(job, AnnotateJob) else [*job.a, *job.b]
    missing = [path for path in dict.fromkeys(inputs) if not path.exists() and path in makers]
    if not missing:
        return job, False
    for path in missing:
        if makers[path].prompts.source.startswith(HUB_PREFIX):
            raise InputError(f"{path.name} is not made yet and its prompts ({makers[path].prompts.source}) are on the "
                             "hub, which a dry run does not fetch")
    stand_ins = {path: stand_in_file(makers[path], scratch / f"{n}-{path.name}") for n, path in enumerate(missing)}
    if isinstance(job, AnnotateJob):
        return dataclasses.replace(job, rollouts=stand_ins[job.rollouts]), True
    return dataclasses.replace(job, a=tuple(stand_ins.get(p, p) for p in job.a),
                               b=tuple(stand_ins.get(p, p) for p in job.b)), True


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
    ids = [jobs.rm_name(recipe, n)[0] for n in prefs.split(",") if n.strip()]
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


def missing_upstream(pipeline: Pipeline, paths: list[Path]) -> tuple[list[tuple[str, str]], set[str]]:
    """What must be made before `paths` exist: (unit, path) of every missing output on the way, in
    stage order, and the keys of the units that make them (walking up from the units that write
    `paths` until outputs exist). A path no unit writes is not in either."""
    units = {unit.key: unit for stage in pipeline.stages() for unit in pipeline.units(stage)}
    writer = {Path(out): unit for unit in units.values() for out in unit.outputs}
    needed = {Path(p) for p in paths}
    keys: set[str] = set()
    todo = [writer[p] for p in needed if p in writer]
    while todo:
        unit = todo.pop()
        if unit.key in keys or (all(p.exists() for p in unit.outputs) and not needed & set(unit.outputs)):
            continue
        keys.add(unit.key)
        todo += [units[k] for k in unit.upstream if k in units]
    if keys and "tiny-model" in units:
        keys.add("tiny-model")  # built (or found cached) before anything decodes
    position = {key: n for n, key in enumerate(units)}  # stage order, then each stage's own order
    chosen = sorted((units[k] for k in keys if units[k].outputs), key=lambda u: position[u.key])
    return [(u.key, str(p)) for u in chosen for p in u.outputs if not p.exists() or p in needed], keys


def make_inputs(recipe: Recipe, missing: list[tuple[str, Path, str]], *, command: str, make: bool = False,
                progress: Progress | None = None) -> dict | None:
    """A stage command's inputs that are not there ((what, path, the command that makes it), from
    jobs.missing_inputs): without `make`, one MissingInputsError listing all of them and what they
    need in turn, naming `command` (which makes them); with it, the units of `rlphf run` that write
    them, run as `rlphf run` runs them (same jobs, same fingerprints and markers), then None or the
    run's summary. An input no unit of the recipe writes is named with its own command."""
    from rlphf_cli.errors import MissingInputsError

    if not missing:
        return None
    pipeline = Pipeline(recipe, progress)
    upstream, keys = missing_upstream(pipeline, [path for _, path, _ in missing])
    made = {Path(p) for _, p in upstream}
    unmade = [(what, path, how) for what, path, how in missing if Path(path) not in made]
    if not make or unmade:
        listed = upstream + [(what, str(path)) for what, path, _ in unmade]
        hint = " && ".join([*dict.fromkeys(how for _, _, how in unmade), *([command] if upstream else [])])
        raise MissingInputsError(listed, hint)
    builtin = builtin_model(recipe.model.name)
    with _imports_out_of_gc(), torch_threads(builtin.threads if builtin else None):
        return pipeline.execute(keys=keys)
