"""Learning a soup from picks: the slider mapping, the posterior, the question choice, simulated users."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

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
    assert err_a[10] > bits_bound(0.1, 10, 3)  # 10 noisy picks cannot pin the point down further


def test_the_information_bound():
    assert bits_bound(0.1, 10, 3) == pytest.approx(0.147, abs=0.002)
    assert bits_bound(0.1, 0, 3) == 0.5


# --------------------------------------------------------------------------------------------
# One user's learner, the profiles file and `rlphf profile learn`


def fake_learner(policies, picks=()):
    """A Learner whose 'reward models' count pole words in the answers and whose soups answer with
    their own members' names: no model, so the flow is tested, not the scores."""
    from rlphf_cli.learning import Learner, SoupAnswers
    from rlphf_cli.profiling import axes_of, point_soup

    axes = axes_of(policies)
    prefs = [p for a in axes for p, _ in a.poles()]
    points = grid(axes, 3)
    scales = Scales({p: 0.0 for p in prefs}, {p: 1.0 for p in prefs})

    def score(prompts, answers):
        return {p: [float(a.split().count(p)) for a in answers] for p in prefs}

    def answer(prompt, soups):
        return [" ".join(name for name, w in soup.members for _ in range(max(1, round(4 * w)))) or "plain"
                for soup in soups]

    soups = [point_soup(p, policies, axes) for p in points]
    table = np.stack([scales.features(score(["x"], answer("x", [s])), axes)[0] for s in soups])
    prompts = ["What is rain?", "Why is the sky blue?"]
    answers = [answer(p, soups) for p in prompts]
    known = SoupAnswers(prompts, answers, np.stack([scales.features(score([p] * len(a), a), axes)
                                                    for p, a in zip(prompts, answers, strict=True)]))
    return Learner(policies, scales, table, score, answer, picks=list(picks), known=known)


@pytest.fixture(scope="module")
def serve_policies(serve_recipe):
    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.serving.policies import PolicySet

    return PolicySet.from_spec(serve_spec(serve_recipe))


def test_learner_asks_records_and_refuses_unknown_or_repeated_answers(serve_policies):
    from rlphf_cli.learning import AlreadyAnswered, UnknownComparison

    learner = fake_learner(serve_policies)
    comp = learner.ask("What is rain?")
    assert comp.answers[0] != comp.answers[1] and comp.gain > 0
    summary = learner.record(comp.id, "a")
    assert summary["picks"] == 1 and set(summary["point"]) == {"expertise", "informativeness", "style"}
    with pytest.raises(AlreadyAnswered):
        learner.record(comp.id, "b")
    with pytest.raises(UnknownComparison):
        learner.record("nope", "a")


def test_questions_without_a_prompt_show_the_prepared_answers_and_never_repeat(serve_policies):
    from rlphf_cli.profiling import point_soup

    learner = fake_learner(serve_policies)
    known = learner.known
    grid_index = {point_soup(q, learner.policies, learner.axes).key: i for i, q in enumerate(learner.points)}
    shown = set()
    for outcome in ("a", "b", "tie", "a", "b", "a"):
        comp = learner.ask()
        p = known.prompts.index(comp.prompt)
        soups = tuple(grid_index[key] for key in comp.soups)
        assert comp.answers == tuple(known.answers[p][i] for i in soups)  # the prepared answers, not new ones
        assert comp.diff == pytest.approx(tuple(known.features[p, soups[0]] - known.features[p, soups[1]]))
        assert (p, *sorted(soups)) not in shown and comp.gain > 0
        shown.add((p, *sorted(soups)))
        learner.record(comp.id, outcome)



def test_saved_profiles_keep_other_users_and_load_in_serve(serve_policies, tmp_path):
    from rlphf_cli.learning import learned_picks, save_profile
    from rlphf_cli.serving.policies import load_profiles

    path = tmp_path / "profiles.yaml"
    path.write_text("users:\n  bob: P1A+P2A+P3A\n")
    learner = fake_learner(serve_policies)
    shown = []
    for outcome, prompt in (("a", "Tell me about snow."), ("b", None), ("tie", None), ("a", None)):
        comp = learner.ask(prompt)
        shown.append((comp.prompt, *sorted(comp.soups)))
        learner.record(comp.id, outcome)
    save_profile(path, "alice", learner.summary(), learner.picks)
    soups = load_profiles(path, serve_policies)
    assert soups["bob"].key == serve_policies.resolve("P1A+P2A+P3A").key
    assert soups["alice"].key == learner.summary()["soup"]
    again = fake_learner(serve_policies, learned_picks(path, "alice"))
    assert again.summary()["point"] == learner.summary()["point"]  # replayed from the saved picks
    # After a restart the prepared questions already answered are not asked again.
    assert len(again.asked) == 3  # the question on a prompt of the user's own is not a prepared one
    for _ in range(4):
        comp = again.ask()
        assert (comp.prompt, *sorted(comp.soups)) not in shown
        shown.append((comp.prompt, *sorted(comp.soups)))


def test_cli_profile_learn_saves_the_soup(serve_policies, serve_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import rlphf_cli.learning as learning
    from rlphf_cli.cli.main import app

    monkeypatch.setattr(learning, "run_learner", lambda recipe, path, user, strategy="active":
                        fake_learner(serve_policies))
    path = tmp_path / "profiles.yaml"
    path.write_text("users:\n  bob: P1A+P2A+P3A\n")
    result = CliRunner().invoke(app, ["profile", "learn", "--user", "alice", "--rounds", "3", "--profiles", str(path),
                                      "--run-dir", str(serve_run)], input="x\n1\n=\n2\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("± ") >= 4 * 3 and "type 1, 2, = or 0" in result.output
    saved = yaml.safe_load(path.read_text())
    assert set(saved["users"]) == {"bob", "alice"} and len(saved["learned"]["alice"]["picks"]) == 3
