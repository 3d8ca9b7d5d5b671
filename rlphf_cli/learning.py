"""One user's soup learned from picks, for `rlphf profile learn` and `rlphf serve`: the questions,
the picks, and the profiles file both read and write. The maths is rlphf_cli.profiling.

A question is a prompt and two grid soups. Every grid soup answers the question prompts once per run
(a few held-out prompts; the answers and their reward-model features are stored in
profile/soups.json), so the prompt and the pair are chosen by expected information gain on the very
answers the user will see (on the tiny run, 10 picks: a mean error of 0.23 instead of 0.25 when
the pair was chosen on each soup's typical features and shown on a random prompt). A prompt of the
user's own has no answers yet: the pair is chosen on the soups' typical features, only those two
soups answer, and the pick updates the posterior with the features of the answers actually shown.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from rlphf_cli.errors import InputError
from rlphf_cli.profiling import (
    OUTCOMES,
    LearnSettings,
    Pick,
    Scales,
    axes_of,
    choose_question,
    grid,
    point_members,
    point_soup,
    replay,
)

QUESTION_PROMPTS = 10  # held-out prompts every grid soup answers once, for the questions
Scorer = Callable[[list[str], list[str]], dict[str, list[float]]]  # (prompts, answers) -> {pref id: scores}
Answerer = Callable[[str, list], list[str]]  # (prompt, [Soup, ...]) -> one answer per soup


class UnknownComparison(InputError):
    """A comparison id this learner never issued (HTTP 404)."""


class AlreadyAnswered(InputError):
    """A second pick for one comparison (HTTP 409)."""


@dataclass
class Comparison:
    id: str
    prompt: str
    answers: tuple[str, str]
    soups: tuple[str, str]  # the soups' model strings
    diff: tuple[float, ...]  # features of answer 1 minus answer 2
    gain: float
    outcome: str | None = None

    def public(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "answers": list(self.answers), "soups": list(self.soups),
                "expected_bits": round(self.gain, 4)}


@dataclass(frozen=True)
class SoupAnswers:
    """Every grid soup's answer to each question prompt, made once per run, and their features."""

    prompts: list[str]
    answers: list[list[str]]  # [prompt][soup]
    features: np.ndarray  # (prompts, soups, dims)


@dataclass
class Learner:
    """The questions asked of one user and what their picks say."""

    policies: object  # serving.policies.PolicySet
    scales: Scales
    table: np.ndarray  # (grid soups, dims): typical features, for a prompt of the user's own
    score: Scorer
    answer: Answerer
    settings: LearnSettings = field(default_factory=LearnSettings)
    picks: list[Pick] = field(default_factory=list)
    strategy: str = "active"
    known: SoupAnswers | None = None  # questions without a prompt of their own are chosen among these

    def __post_init__(self):
        self.axes = axes_of(self.policies)
        self.points = grid(self.axes, self.settings.grid)
        if self.table.shape != self.points.shape:
            raise InputError(f"soup features for {self.table.shape[0]} soups of {self.table.shape[1]} dimensions; "
                             f"the sliders have {len(self.points)} of {len(self.axes)} (rebuild profile/soups.json)")
        self.posterior = replay(self.axes, self.picks, self.settings)
        self.pending: dict[str, Comparison] = {}
        self.asked: set[tuple[int, int, int]] = self._asked_before()  # (prompt, soup, soup) of `known`
        self.rng = np.random.default_rng([self.settings.seed, len(self.picks)])
        self._lock = threading.Lock()

    def _asked_before(self) -> set[tuple[int, int, int]]:
        """The prepared questions that the replayed picks answered (a restart must not ask them again)."""
        if self.known is None:
            return set()
        prompts = {p: i for i, p in enumerate(self.known.prompts)}
        soups = {point_soup(point, self.policies, self.axes).key: i for i, point in enumerate(self.points)}
        asked = set()
        for pick in self.picks:
            prompt, a, b = pick.question or (None, None, None)
            if prompt in prompts and a in soups and b in soups:
                asked.add((prompts[prompt], soups[a], soups[b]))
        return asked

    def ask(self, prompt: str | None = None) -> Comparison:
        """The next question: on `prompt`, or without one the most telling among `known`'s."""
        known = self.known if prompt is None else None
        if prompt is None and known is None:
            raise InputError("a prompt to ask with: this learner has no prepared answers")
        with self._lock:
            if known is not None:
                q = choose_question(self.posterior, known.features, range(len(known.prompts)), strategy=self.strategy,
                                    rng=self.rng, asked=self.asked)
                self.asked.add((q.prompt, q.a, q.b))
            else:
                q = choose_question(self.posterior, self.table[None], [0], strategy=self.strategy, rng=self.rng)
        soups = [point_soup(self.points[i], self.policies, self.axes) for i in (q.a, q.b)]
        if known is not None:
            prompt, answers = known.prompts[q.prompt], [known.answers[q.prompt][i] for i in (q.a, q.b)]
            diff = known.features[q.prompt, q.a] - known.features[q.prompt, q.b]
        else:
            answers = self.answer(prompt, soups)
            feats = self.scales.features(self.score([prompt, prompt], list(answers)), self.axes)
            diff = feats[0] - feats[1]
        comp = Comparison(uuid.uuid4().hex[:16], prompt, (answers[0], answers[1]), tuple(s.key for s in soups),
                          tuple(float(v) for v in diff), q.gain)
        with self._lock:
            self.pending[comp.id] = comp
        return comp

    def record(self, comparison_id: str, outcome: str) -> dict:
        if outcome not in OUTCOMES:
            raise InputError(f"pick '{outcome}': expected one of {', '.join(OUTCOMES)}")
        with self._lock:
            comp = self.pending.get(comparison_id)
            if comp is None:
                raise UnknownComparison(f"comparison '{comparison_id}': not asked of this user (or the server restarted)")
            if comp.outcome is not None:
                raise AlreadyAnswered(f"comparison '{comparison_id}': already answered ({comp.outcome})")
            comp.outcome = outcome
            pick = Pick(comp.diff, outcome, (comp.prompt, *comp.soups))
            self.posterior.update(pick)
            self.picks.append(pick)
        return self.summary()

    def summary(self) -> dict:
        out = self.posterior.summary()
        members = point_members(self.posterior.mean(), self.axes)
        soup = point_soup(self.posterior.mean(), self.policies, self.axes)
        out.update(soup=soup.key, members=members)
        return out


# --------------------------------------------------------------------------------------------
# The profiles file (`rlphf serve --profiles`): users' soups, and what learned them


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PickRecord(_Strict):
    diff: list[float]
    outcome: str
    question: list[str] | None = None  # prompt, soup A, soup B


class LearnedProfile(_Strict):
    point: dict[str, float]
    uncertainty: dict[str, float]
    picks: list[PickRecord] = Field(default_factory=list)


_FILE_LOCK = threading.Lock()


def _read(path: Path) -> dict:
    if not path.is_file():
        return {"users": {}}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read profiles: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with 'users'")
    data.setdefault("users", {})
    return data


def save_profile(path: str | Path, user: str, summary: Mapping, picks: Sequence[Pick]) -> Path:
    """Write one user's learned soup (`users`) and its point, uncertainty and picks (`learned`),
    keeping every other user; atomically (a reader sees the old file or the new one)."""
    from rlphf_cli.runs import atomic_write_text

    file = Path(path).expanduser()
    with _FILE_LOCK:
        data = _read(file)
        data["users"][user] = dict(summary["members"]) or "base"
        learned = LearnedProfile(point=summary["point"], uncertainty=summary["uncertainty"],
                                 picks=[PickRecord(diff=list(p.diff), outcome=p.outcome,
                                                    question=list(p.question) if p.question else None)
                                         for p in picks])
        data.setdefault("learned", {})[user] = learned.model_dump()
        atomic_write_text(file, yaml.safe_dump(data, sort_keys=False))
    return file


def learned_picks(path: str | Path, user: str) -> list[Pick]:
    """The picks a user's profile was learned from (none for a new user or a hand-written profile)."""
    file = Path(path).expanduser()
    entry = _read(file).get("learned", {}).get(user)
    if not entry:
        return []
    profile = LearnedProfile.model_validate(entry)
    return [Pick(tuple(p.diff), p.outcome, tuple(p.question) if p.question else None) for p in profile.picks]


# --------------------------------------------------------------------------------------------
# A run's reward models and soup features


def soups_path(run_path: str | Path) -> Path:
    return Path(run_path) / "profile" / "soups.json"


def reward_scorer(run_path: str | Path, prefs: Sequence[str]) -> Scorer:
    """The run's reward models rm/<id>/ as one scorer; InputError naming the missing ones."""
    from rlphf_cli.training.reward import RewardScorer

    run = Path(run_path)
    missing = [p for p in prefs if not (run / "rm" / p / "adapter_config.json").is_file()]
    if missing:
        raise InputError(f"{run}: no reward model for {', '.join(missing)} (rm/<id>/); learning a soup needs the "
                         "run's reward models: rlphf train-rm --prefs all")
    scorers = {p: RewardScorer(run / "rm" / p) for p in prefs}
    return lambda prompts, answers: {p: s.score(prompts, answers) for p, s in scorers.items()}


def served_prefs(policies) -> list[str]:
    return [p for a in axes_of(policies) for p, _ in a.poles()]


def prepare(run_path: str | Path, policies, score: Scorer, answer: Answerer, prompts: Sequence[str],
            settings: LearnSettings = LearnSettings()) -> tuple[Scales, np.ndarray, SoupAnswers]:
    """The run's reward-model scales, every grid soup's answers to `prompts` with their features, and
    each soup's typical features (their mean), made once and stored with the run."""
    import json

    from rlphf_cli.profiling import fit_scales, load_scales
    from rlphf_cli.runs import atomic_write_json

    prefs = served_prefs(policies)
    scales = load_scales(run_path)
    if scales is None or set(scales.mean) != set(prefs):
        scales = fit_scales(run_path, {p: (lambda ps, ans, p=p: score(ps, ans)[p]) for p in prefs})
    axes = axes_of(policies)
    points = grid(axes, settings.grid)
    path = soups_path(run_path)
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("points") == points.tolist() and data.get("prompts") == list(prompts) and "answers" in data:
            known = SoupAnswers(list(prompts), data["answers"], np.array(data["answer_features"]))
            return scales, np.array(data["features"]), known
    feats = np.zeros((len(prompts), len(points), len(axes)))
    answers = []
    for i, prompt in enumerate(prompts):
        answers.append(answer(prompt, [point_soup(p, policies, axes) for p in points]))
        feats[i] = scales.features(score([prompt] * len(answers[i]), answers[i]), axes)
    table = feats.mean(axis=0)
    atomic_write_json(path, {"points": points.tolist(), "features": table.tolist(), "prompts": list(prompts),
                             "answers": answers, "answer_features": feats.tolist()})
    return scales, table, SoupAnswers(list(prompts), answers, feats)


def generator_answerer(recipe, cache: int = 4) -> Answerer:
    """Answers as `rlphf generate --soup` makes them (the recipe's sampling, seeded per prompt; the
    soup's preference prompts appended, as the server does by default); the last few soups kept loaded."""
    from collections import OrderedDict

    from rlphf_cli import jobs
    from rlphf_cli.generation import Generator

    loaded: OrderedDict = OrderedDict()

    def answer(prompt: str, soups: list) -> list[str]:
        out = []
        for soup in soups:
            gen = loaded.pop(soup.key, None)
            if gen is None:
                weights = jobs.weights(recipe, soup=list(soup.members)) if soup.members else jobs.weights(recipe)
                gen = Generator.load(jobs.model_spec(recipe), weights, sampling=jobs.sampling(recipe))
            loaded[soup.key] = gen
            while len(loaded) > cache:
                loaded.popitem(last=False)
            text = gen.prompt_text(prompt, jobs.prompted(soup.preferences))
            out.append(gen.generate([text])[0][0][0][0])
        return out

    return answer


def run_learner(recipe, profiles: str | Path, user: str, *, strategy: str = "active",
                question_prompts: int = QUESTION_PROMPTS) -> Learner:
    """A Learner on the run of `recipe` (its policies, reward models and evaluation prompts),
    continuing from the user's learned picks in `profiles`."""
    from rlphf_cli import jobs
    from rlphf_cli.serving.policies import PolicySet
    from rlphf_cli.specs import PromptSet

    policies = PolicySet.from_spec(jobs.serve_spec(recipe))
    run = jobs.run_dir(recipe).root
    score = reward_scorer(run, served_prefs(policies))
    answer = generator_answerer(recipe)
    prompts = [p["instruction"] for p in PromptSet(recipe.data.eval_prompts, recipe.data.max_eval_prompts).load()]
    settings = jobs.learn_settings(recipe)
    scales, table, known = prepare(run, policies, score, answer, prompts[:question_prompts], settings)
    return Learner(policies, scales, table, score, answer, settings=settings, picks=learned_picks(profiles, user),
                   strategy=strategy, known=known)
