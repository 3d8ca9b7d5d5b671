"""Learning a soup from picks: the slider mapping, the posterior, the question choice, simulated users."""

from __future__ import annotations

import numpy as np
import pytest

from rlphf_cli.errors import InputError
from rlphf_cli.profiling import (
    Axis,
    Bank,
    LearnSettings,
    Pick,
    Posterior,
    Scales,
    bits_bound,
    grid,
    outcome_probs,
    point_members,
    replay,
    simulate,
)

AXES = [Axis("expertise", "P1A", "P1B"), Axis("informativeness", "P2A", "P2B"), Axis("style", "P3A", "P3B")]


def synthetic_bank(prompts: int = 12, noise: float = 0.3, seed: int = 0) -> Bank:
    """Answers of a soup lean toward its poles, in proportion to its share of each (the average
    merge normalizes the sliders' weights); the reward models see them with noise of their own."""
    rng = np.random.default_rng(seed)
    points = grid(AXES, 3)
    share = points / np.maximum(np.abs(points).sum(axis=1, keepdims=True), 1.0)
    truth = share[None] + noise * rng.standard_normal((prompts, *points.shape))
    learner = truth + noise * rng.standard_normal(truth.shape)
    return Bank(points, learner, truth)


def test_points_map_to_soups_as_the_sliders_do():
    assert point_members([-0.4, 0.0, 1.0], AXES) == {"P1A": 0.4, "P3B": 1.0}
    assert point_members([0, 0, 0], AXES) == {}
    half = [Axis("expertise", None, "P1B")]
    assert grid(half, 3).ravel().tolist() == [0.0, 1.0]  # no pole served: no point there
    with pytest.raises(InputError, match="2 values for 3 dimensions"):
        point_members([0, 1], AXES)


def test_served_sliders_resolve_to_the_servers_soup(serve_recipe):
    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.profiling import axes_of, point_soup
    from rlphf_cli.serving.policies import PolicySet

    policies = PolicySet.from_spec(serve_spec(serve_recipe))
    axes = axes_of(policies)
    assert [(a.left, a.right) for a in axes] == [("P1A", None), ("P2A", "P2B"), ("P3A", None)]
    soup = point_soup([-1.0, 0.5, -0.5], policies, axes)
    assert soup.key == policies.resolve({"P1A": 1.0, "P2B": 0.5, "P3A": 0.5}).key
    assert point_soup([0.0, 0.0, 0.0], policies, axes).key == "base"


def test_scales_standardize_and_sign_features():
    scales = Scales.fit({"P2A": [0.0, 2.0], "P2B": [1.0, 3.0]})
    f = scales.features({"P2A": [2.0, 0.0], "P2B": [1.0, 3.0]}, AXES[1:2])
    # the first answer is concise by P2A (+1 sd) and not informative (-1 sd): both say "toward P2A"
    assert f[:, 0].tolist() == [-1.0, 1.0]
    assert Scales.from_dict(scales.to_dict()) == scales


def test_ties_carry_less_information_than_picks():
    s = LearnSettings()
    probs = outcome_probs(np.array([-1.0, 0.0, 1.0]), s)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs[2, 0] > probs[1, 0] > probs[0, 0] and probs[1, 2] == probs[:, 2].max()
    diff = (1.0, 0.0, 0.0)
    stds = {o: replay(AXES, [Pick(diff, o)] * 3).std()[0] for o in ("a", "tie", "bad")}
    prior = Posterior(AXES).std()[0]
    assert stds["a"] < stds["tie"] < stds["bad"] < prior
    with pytest.raises(InputError, match="expected one of"):
        Pick(diff, "maybe")


def test_picks_move_the_estimate_toward_the_picked_pole():
    post = replay(AXES, [Pick((0.0, 1.0, 0.0), "a")] * 5)
    assert post.mean()[1] > 0.3 and abs(post.mean()[0]) < 0.1
    assert post.summary()["picks"] == 5


def test_active_questions_beat_random_ones_on_simulated_users():
    bank = synthetic_bank()
    users = np.random.default_rng(1).uniform(-1, 1, (30, 3))
    kw = dict(picks=10, flip=0.1, learn_prompts=range(6), eval_prompts=range(6, 12))
    active = simulate(bank, users, strategy="active", **kw)
    random = simulate(bank, users, strategy="random", **kw)
    err_a, err_r = active.error.mean(axis=0), random.error.mean(axis=0)
    assert err_a[0] == pytest.approx(err_r[0])  # the same prior
    assert err_a[10] < err_r[10] and err_a[10] < 0.3
    assert active.win[:, 10].mean() > 0.65 > active.win[:, 0].mean()
    assert err_a[10] > bits_bound(0.1, 10, 3)  # no learner beats the information bound


def test_the_information_bound():
    assert bits_bound(0.1, 10, 3) == pytest.approx(0.147, abs=0.002)
    assert bits_bound(0.1, 0, 3) == 0.5
