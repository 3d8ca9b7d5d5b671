"""Learning a user's soup from A/B picks.

A profile is a point in the playground's slider space: one value per served dimension in [-1, 1],
-1 its first pole, 0 "no policy of this dimension", +1 its second pole. `point_soup` maps it to a
soup as the sliders do (the value's sign picks the pole, its size the weight; the server's
resolver then normalizes the weights, so that mapping lives in one place: PolicySet.resolve).

The user's utility for an answer is `point . features(answer)`, where a dimension's feature is its
served reward models' standardized scores (second pole's minus first pole's; `Scales`, stored with
the run). A pick between A and B follows Bradley-Terry on the utility difference, with Rao-Kupper
ties (a tie says the difference is small: less evidence than a pick) and a lapse share of picks
that are noise; "both bad" counts as a tie at half weight (the user saw neither win, but may have
judged on something outside the dimensions).

The posterior over the point is kept as weighted particles, not a Laplace approximation: the prior
is a box (the sliders stop at the poles), the lapse and tie terms make the likelihood non-log-concave,
and after a few picks the posterior is a flat wedge cut by half-spaces, nothing like a Gaussian. With
at most a handful of dimensions a few thousand fixed particles cover the box, the update is exact
reweighting, and the expected information gain of a question is an exact sum over them. The
particles are drawn from a fixed seed, so a profile is stored as its picks and replayed.

No torch here: reward models and generation are passed in as callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlphf_cli.errors import InputError
from rlphf_cli.specs import LearnSettings

OUTCOMES = ("a", "b", "tie", "bad")
PICK_KEYS = {"1": "a", "2": "b", "=": "tie", "0": "bad"}  # what a person types in `rlphf profile learn`


# --------------------------------------------------------------------------------------------
# The space: the playground's sliders


@dataclass(frozen=True)
class Axis:
    """One slider: a dimension with its first (left, -1) and second (right, +1) pole, each a
    preference id or None when no policy of it is served."""

    dimension: str
    left: str | None
    right: str | None

    def poles(self) -> list[tuple[str, float]]:
        return [(p, s) for p, s in ((self.left, -1.0), (self.right, 1.0)) if p]


def axes_of(policies) -> list[Axis]:
    """The sliders the playground shows for a PolicySet (PolicySet.dimensions(), served poles only)."""
    out = []
    for dim in policies.dimensions():
        poles = [p["id"] if p["served"] else None for p in dim["poles"]] + [None, None]
        out.append(Axis(dim["dimension"], poles[0], poles[1]))
    return out


def point_members(point: Sequence[float], axes: Sequence[Axis]) -> dict[str, float]:
    """{preference id: weight}: the members the sliders at `point` name (0 and unserved sides: none)."""
    if len(point) != len(axes):
        raise InputError(f"a point of {len(point)} values for {len(axes)} dimensions")
    members = {}
    for value, axis in zip(point, axes, strict=True):
        pole = axis.left if value < 0 else axis.right if value > 0 else None
        if pole:
            members[pole] = round(abs(float(value)), 4)
    return members


def point_soup(point: Sequence[float], policies, axes: Sequence[Axis] | None = None):
    """The Soup the server decodes with for a point, resolved as a request's `preferences` are."""
    from rlphf_cli.serving.policies import Soup

    members = point_members(point, axes if axes is not None else axes_of(policies))
    return policies.resolve(members, where="profile") if members else Soup()


def soup_spec(members: Mapping[str, float]) -> str:
    """The soup as the `model` string ('base' when empty)."""
    return ",".join(f"{k}={v:g}" for k, v in members.items()) or "base"


def grid(axes: Sequence[Axis], levels: int) -> np.ndarray:
    """Slider points on a grid of `levels` values per dimension, skipping unserved sides."""
    values = np.linspace(-1.0, 1.0, levels)
    per_axis = [[v for v in values if (v < 0 and a.left) or (v > 0 and a.right) or v == 0] for a in axes]
    mesh = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


# --------------------------------------------------------------------------------------------
# Reward-model features


@dataclass(frozen=True)
class Scales:
    """Each reward model's score mean and spread on the run's held-out answers."""

    mean: dict[str, float]
    std: dict[str, float]
    source: str = ""

    @classmethod
    def fit(cls, scores: Mapping[str, Sequence[float]], source: str = "") -> Scales:
        mean, std = {}, {}
        for pref, values in scores.items():
            arr = np.asarray(values, dtype=float)
            if arr.size < 2:
                raise InputError(f"standardizing {pref}: {arr.size} held-out scores; need at least 2")
            mean[pref], std[pref] = float(arr.mean()), float(arr.std()) or 1.0
        return cls(mean, std, source)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping) -> Scales:
        return cls(dict(data["mean"]), dict(data["std"]), data.get("source", ""))

    def features(self, scores: Mapping[str, Sequence[float]], axes: Sequence[Axis]) -> np.ndarray:
        """(answers, dimensions): per dimension the mean of its poles' standardized scores, signed
        so that + is the second pole."""
        n = len(next(iter(scores.values())))
        out = np.zeros((n, len(axes)))
        for d, axis in enumerate(axes):
            poles = [(p, s) for p, s in axis.poles() if p in scores]
            for pref, sign in poles:
                out[:, d] += sign * (np.asarray(scores[pref], float) - self.mean[pref]) / self.std[pref]
            if poles:
                out[:, d] /= len(poles)
        return out


def scales_path(run_path: str | Path) -> Path:
    return Path(run_path) / "profile" / "scales.json"


def held_out_answers(run_path: str | Path, limit: int = 400) -> list[tuple[str, str]]:
    """(instruction, response) pairs the reward models were not trained on: the run's evaluation
    outputs (generations/, on evaluation prompts), else its rollouts. Spread evenly over files."""
    from rlphf_cli.runs import read_jsonl

    run = Path(run_path)
    files = sorted((run / "generations").rglob("*.jsonl")) or [run / "rollouts.jsonl"]
    pairs: list[tuple[str, str]] = []
    for path in files:
        if path.is_file():
            pairs += [(r["instruction"], r["response"]) for r in read_jsonl(path) if r.get("response")]
    if not pairs:
        raise InputError(f"{run}: no held-out answers to standardize reward-model scores on "
                         "(run `rlphf run` to make generations/ or rollouts.jsonl)")
    step = max(1, len(pairs) // limit)
    return pairs[::step][:limit]


def fit_scales(run_path: str | Path, scorers: Mapping[str, Callable[[list[str], list[str]], list[float]]],
               limit: int = 400) -> Scales:
    """Score the run's held-out answers with each reward model and store the result with the run
    (profile/scales.json, atomically)."""
    from rlphf_cli.runs import atomic_write_json

    pairs = held_out_answers(run_path, limit)
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    scales = Scales.fit({pref: score(prompts, answers) for pref, score in scorers.items()},
                        source=f"{len(pairs)} held-out answers of {Path(run_path)}")
    atomic_write_json(scales_path(run_path), scales.to_dict())
    return scales


def load_scales(run_path: str | Path) -> Scales | None:
    from rlphf_cli import files

    path = scales_path(run_path)
    return Scales.from_dict(files.read_json_object(path, "reward-model scales")) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# The likelihood and the posterior


def outcome_probs(gap: np.ndarray, s: LearnSettings) -> np.ndarray:
    """P(a), P(b), P(tie) for utility gaps u(A) - u(B): Rao-Kupper on a logistic, mixed with lapses."""
    t = max(s.temperature, 1e-6)
    pa = 1.0 / (1.0 + np.exp(-(gap - s.tie_width) / t))
    pb = 1.0 / (1.0 + np.exp(-(-gap - s.tie_width) / t))
    p = np.stack([pa, pb, np.clip(1.0 - pa - pb, 0.0, 1.0)], axis=-1)
    return (1.0 - s.lapse) * p + s.lapse / 3.0


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log2(np.clip(p, 1e-12, 1.0))).sum(axis=-1)


@dataclass(frozen=True)
class Pick:
    """One answered question: the feature difference of the two answers (A minus B) and the answer."""

    diff: tuple[float, ...]
    outcome: str
    question: tuple[str, str, str] | None = None  # (prompt, soup A, soup B), so a replay never asks it again

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise InputError(f"pick '{self.outcome}': expected one of {', '.join(OUTCOMES)}")


class Posterior:
    """Weighted particles over the box [-1, 1]^D (see the module docstring for why particles)."""

    def __init__(self, axes: Sequence[Axis], settings: LearnSettings = LearnSettings()):
        self.axes = list(axes)
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        points = rng.uniform(-1.0, 1.0, (settings.particles, len(self.axes)))
        # A side with no served policy cannot be chosen: the sliders stay at "none" there.
        for d, axis in enumerate(self.axes):
            lo, hi = (-1.0 if axis.left else 0.0), (1.0 if axis.right else 0.0)
            points[:, d] = lo + (points[:, d] + 1.0) / 2.0 * (hi - lo)
        self.points = points
        self.logw = np.zeros(len(points))
        self.picks: list[Pick] = []

    def update(self, pick: Pick) -> None:
        diff = np.asarray(pick.diff, dtype=float)
        probs = outcome_probs(self.points @ diff, self.settings)
        if pick.outcome == "bad":
            loglik = self.settings.bad_weight * np.log(probs[:, 2])
        else:
            loglik = np.log(probs[:, OUTCOMES.index(pick.outcome)])
        self.logw = self.logw + loglik
        self.logw -= self.logw.max()
        self.picks.append(pick)

    @property
    def weights(self) -> np.ndarray:
        w = np.exp(self.logw - self.logw.max())
        return w / w.sum()

    def mean(self) -> np.ndarray:
        return self.weights @ self.points

    def std(self) -> np.ndarray:
        w, m = self.weights, self.mean()
        return np.sqrt(np.clip(w @ (self.points - m) ** 2, 0.0, None))

    def information(self, diffs: np.ndarray, particles: int = 512) -> np.ndarray:
        """Expected information gain, in bits, of asking each question (rows of `diffs`: A minus B),
        over `particles` drawn from the posterior by weight (systematic, fixed seed)."""
        w = self.weights
        picks = np.searchsorted(np.cumsum(w), (np.arange(particles) + 0.5) / particles).clip(0, len(w) - 1)
        probs = outcome_probs(self.points[picks] @ diffs.T, self.settings)  # (particles, C, 3)
        return _entropy(probs.mean(axis=0)) - _entropy(probs).mean(axis=0)

    def screen(self, diffs: np.ndarray, keep: int = 64) -> np.ndarray:
        """Indices of the `keep` questions whose answer the posterior predicts least well, by the
        spread of the utility gap relative to its mean (cheap: only the posterior's mean and
        covariance); the exact information gain is then computed for those only."""
        if len(diffs) <= keep:
            return np.arange(len(diffs))
        w, m = self.weights, self.mean()
        centred = self.points - m
        cov = (centred * w[:, None]).T @ centred
        mu = diffs @ m
        sd = np.sqrt(np.clip(np.einsum("cd,de,ce->c", diffs, cov, diffs), 0.0, None))
        score = sd / np.sqrt(mu ** 2 + sd ** 2 + self.settings.temperature ** 2)
        return np.argsort(-score, kind="stable")[:keep]

    def summary(self) -> dict:
        """What a profile shows: the point, its uncertainty and the picks behind it."""
        return {"point": {a.dimension: round(float(v), 4) for a, v in zip(self.axes, self.mean(), strict=True)},
                "uncertainty": {a.dimension: round(float(v), 4) for a, v in zip(self.axes, self.std(), strict=True)},
                "picks": len(self.picks)}


def replay(axes: Sequence[Axis], picks: Sequence[Pick], settings: LearnSettings = LearnSettings()) -> Posterior:
    post = Posterior(axes, settings)
    for pick in picks:
        post.update(pick)
    return post


# --------------------------------------------------------------------------------------------
# Choosing the question


@dataclass(frozen=True)
class Question:
    prompt: int  # index into the candidate prompts
    a: int  # indices into the candidate soups (grid points)
    b: int
    gain: float  # expected bits (0 for a random question)


def candidate_pairs(n_soups: int) -> np.ndarray:
    i, j = np.triu_indices(n_soups, k=1)
    return np.stack([i, j], axis=1)


def choose_question(post: Posterior, features: np.ndarray, prompts: Sequence[int], *, strategy: str = "active",
                    rng: np.random.Generator | None = None, asked: Collection[tuple[int, int, int]] = ()) -> Question:
    """The next question among `prompts` x pairs of soups, other than the (prompt, a, b) already
    `asked`. `features`: (prompts, soups, dims), the answers' reward-model features. 'active': the
    largest expected information gain; 'random': a random pair of soups whose answers differ (the
    baseline). The information gain is exact over a shortlist (Posterior.screen): computing it for
    every prompt x pair each round costs seconds."""
    rng = rng or np.random.default_rng(0)
    pairs = candidate_pairs(features.shape[1])
    if strategy == "random":
        for _ in range(100):
            p = int(rng.choice(prompts))
            a, b = pairs[rng.integers(len(pairs))]
            if not np.allclose(features[p, a], features[p, b]) and (p, int(a), int(b)) not in asked:
                break
        return Question(p, int(a), int(b), 0.0)
    if strategy != "active":
        raise InputError(f"question strategy '{strategy}': expected active or random")
    prompts = list(prompts)
    diffs = np.concatenate([features[p, pairs[:, 0]] - features[p, pairs[:, 1]] for p in prompts])
    pair_index = {(int(a), int(b)): i for i, (a, b) in enumerate(pairs)}
    seen = [prompts.index(p) * len(pairs) + pair_index[min(a, b), max(a, b)]
            for p, a, b in asked if p in prompts and (min(a, b), max(a, b)) in pair_index]
    if seen:  # asked once already: the user would see the same two answers again
        diffs[seen] = 0.0
    shortlist = post.screen(diffs)
    gains = post.information(diffs[shortlist])
    k = int(shortlist[int(np.argmax(gains))])
    p, pair = divmod(k, len(pairs))
    return Question(int(prompts[p]), int(pairs[pair, 0]), int(pairs[pair, 1]), float(gains.max()))


def nearest(points: np.ndarray, point: np.ndarray) -> int:
    """The grid point closest to an estimate: the soup whose answers stand for the learned one."""
    return int(np.argmin(((points - point) ** 2).sum(axis=1)))


# --------------------------------------------------------------------------------------------
# Simulated users (benchmarks/learn_soup.py and the tests)


@dataclass
class Bank:
    """Answers precomputed once per grid soup and prompt, measured two ways: `learner` (the run's
    reward models, what the learner sees) and `truth` (the rubric judge's measures, what the
    simulated user picks by), both (prompts, soups, dims) and standardized."""

    points: np.ndarray  # (soups, dims) slider points
    learner: np.ndarray
    truth: np.ndarray
    centre: int = field(init=False)

    def __post_init__(self):
        self.centre = nearest(self.points, np.zeros(self.points.shape[1]))


@dataclass(frozen=True)
class SimResult:
    strategy: str
    error: np.ndarray  # (users, picks + 1): mean absolute error per dimension after k picks
    win: np.ndarray  # (users, picks + 1): win rate of the learned soup vs the centre soup, held-out prompts


def simulate(bank: Bank, true_points: np.ndarray, *, picks: int = 20, strategy: str = "active", flip: float = 0.1,
             tie_margin: float = 0.05, learn_prompts: Sequence[int], eval_prompts: Sequence[int],
             settings: LearnSettings = LearnSettings(), seed: int = 0) -> SimResult:
    """Each simulated user has a hidden point; answers by the sign of the true utility gap (a tie
    within `tie_margin`), turned round with probability `flip`. After every pick the
    learner's estimate is scored: its error, and how often its soup's answers beat the centre
    soup's under the true utility on prompts it never asked about (ties count half)."""
    axes = [Axis(f"d{d}", "L", "R") for d in range(bank.points.shape[1])]
    errors = np.zeros((len(true_points), picks + 1))
    wins = np.zeros_like(errors)
    for u, truth_point in enumerate(true_points):
        rng = np.random.default_rng([seed, u])
        post = Posterior(axes, settings)
        asked: set[tuple[int, int, int]] = set()
        true_util = bank.truth[list(eval_prompts)] @ truth_point  # (eval prompts, soups)
        for k in range(picks + 1):
            estimate = post.mean()
            errors[u, k] = np.abs(estimate - truth_point).mean()
            learned = nearest(bank.points, estimate)
            gap = true_util[:, learned] - true_util[:, bank.centre]
            wins[u, k] = np.where(np.abs(gap) < 1e-9, 0.5, gap > 0).mean()
            if k == picks:
                break
            # As `rlphf profile learn` and serve ask: every grid soup's answers to the question
            # prompts are made once, so the prompt and the pair are chosen on the answers shown.
            q = choose_question(post, bank.learner, list(learn_prompts), strategy=strategy, rng=rng, asked=asked)
            asked.add((q.prompt, q.a, q.b))
            gap_ab = (bank.truth[q.prompt, q.a] - bank.truth[q.prompt, q.b]) @ truth_point
            outcome = "tie" if abs(gap_ab) < tie_margin else ("a" if gap_ab > 0 else "b")
            if rng.random() < flip:  # the other answer
                outcome = {"a": "b", "b": "a"}.get(outcome) or str(rng.choice(["a", "b"]))
            post.update(Pick(tuple(bank.learner[q.prompt, q.a] - bank.learner[q.prompt, q.b]), outcome))
    return SimResult(strategy, errors, wins)


def bits_bound(flip: float, picks: int, dims: int) -> float:
    """Roughly the smallest mean absolute error per dimension `picks` answers can reach from a
    uniform prior on [-1, 1]^dims when each carries at most 1 - H(flip) bits (a binary symmetric
    channel): the volume shrinks at best by 2^-bits, and a box of side s has a mean absolute error of
    s / 4. A volume argument, not a strict bound (after one pick a half-box can sit on it)."""
    h = -flip * math.log2(flip) - (1 - flip) * math.log2(1 - flip) if 0 < flip < 1 else 0.0
    bits = picks * (1 - h)
    side = 2.0 * 2.0 ** (-bits / dims)
    return min(side / 4.0, 0.5)
