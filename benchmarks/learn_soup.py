"""Learning a soup from A/B picks, with simulated users: active questions vs random ones.

1. The bank (once, cached in --bank): every soup of the sliders' grid (3 levels per dimension: the
   poles and "none") answers the run's evaluation prompts greedily, with its preference prompts,
   as `rlphf serve` answers; each answer is scored by the run's reward models (what the learner
   sees, standardized on the run's held-out answers: profile/scales.json) and by the rubric judge's
   measures (what the simulated user picks by, standardized on the same answers), so the learner
   is not graded by its own yardstick.
2. Simulated users: true points spread over the box (uniform), 10% of picks turned round. For
   1..20 picks, active questions (the prompt and pair of soups whose answers have the largest
   expected information gain, as `rlphf profile learn` chooses them) and random ones, neither
   asked twice: the mean absolute error
   per dimension between the learned and the true point, and the win rate, under the true
   utility, of the learned soup's answers against the centre soup's (the base model: what a user
   gets before any pick) on prompts never asked about. The information bound is printed alongside.

Usage: python benchmarks/learn_soup.py --run-dir runs/tiny [--users 60] [--picks 20] [--plot docs/learn-soup.png]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_bank(run: Path, prompts: int, max_new_tokens: int, levels: int, threads: int) -> dict:
    import dataclasses

    import torch

    from rlphf_cli import jobs
    from rlphf_cli.generation import Generator
    from rlphf_cli.judges import rubric
    from rlphf_cli.profiling import Scales, axes_of, fit_scales, grid, held_out_answers, point_soup
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.serving.policies import PolicySet
    from rlphf_cli.specs import PromptSet
    from rlphf_cli.training.reward import RewardScorer

    torch.set_num_threads(threads)
    recipe = load_recipe(run / "recipe.yaml", [], {"run_dir": str(run)})
    policies = PolicySet.from_spec(jobs.serve_spec(recipe))
    axes = axes_of(policies)
    points = grid(axes, levels)
    instructions = [p["instruction"] for p in PromptSet(recipe.data.eval_prompts, prompts).load()]
    sampling = dataclasses.replace(jobs.sampling(recipe), temperature=0.0, max_new_tokens=max_new_tokens)
    answers: list[list[str]] = []
    started = time.perf_counter()
    for point in points:
        soup = point_soup(point, policies, axes)
        weights = jobs.weights(recipe, soup=list(soup.members)) if soup.members else jobs.weights(recipe)
        gen = Generator.load(jobs.model_spec(recipe), weights, sampling=sampling, batch_size=64)
        texts = [gen.prompt_text(i, jobs.prompted(soup.preferences)) for i in instructions]
        answers.append([samples[0][0] for samples in gen.generate(texts)[0]])
        print(f"  soup {soup.key:<40} {time.perf_counter() - started:6.1f} s", flush=True)
    prefs = [p for a in axes for p, _ in a.poles()]
    scorers = {p: RewardScorer(run / "rm" / p).score for p in prefs}
    scales = fit_scales(run, scorers)  # stored with the run: profile/scales.json
    held = held_out_answers(run)
    truth_scales = Scales.fit({p: [rubric.measure(p, a) for _, a in held] for p in prefs}, "rubric")
    flat = [a for per_soup in answers for a in per_soup]
    flat_prompts = instructions * len(points)
    shape = (len(points), len(instructions), len(axes))
    learner = scales.features({p: scorers[p](flat_prompts, flat) for p in prefs}, axes).reshape(shape)
    truth = truth_scales.features({p: [rubric.measure(p, a) for a in flat] for p in prefs}, axes).reshape(shape)
    return {"points": points.tolist(), "learner": learner.transpose(1, 0, 2).tolist(),
            "truth": truth.transpose(1, 0, 2).tolist(), "axes": [a.dimension for a in axes],
            "prompts": instructions, "answers": answers, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished run: policy/ and rm/ per preference")
    ap.add_argument("--bank", type=Path, help="where the answers and scores are cached (default: RUN/profile/bank.json)")
    ap.add_argument("--prompts", type=int, default=30, help="evaluation prompts answered per soup")
    ap.add_argument("--learn-prompts", type=int, default=10, help="of those, the ones questions may use")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--picks", type=int, default=20)
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()

    from rlphf_cli.jobs import learn_settings
    from rlphf_cli.profiling import Bank, bits_bound, simulate
    from rlphf_cli.recipe import load_recipe

    bank_path = args.bank or args.run_dir / "profile" / "bank.json"
    if not bank_path.is_file():
        print(f"building the bank: every grid soup answers {args.prompts} prompts")
        data = build_bank(args.run_dir, args.prompts, args.max_new_tokens, 3, args.threads)
        bank_path.parent.mkdir(parents=True, exist_ok=True)
        bank_path.write_text(json.dumps(data))
    data = json.loads(bank_path.read_text())
    bank = Bank(np.array(data["points"]), np.array(data["learner"]), np.array(data["truth"]))
    n_prompts, dims = bank.learner.shape[0], bank.points.shape[1]
    learn, held = range(args.learn_prompts), range(args.learn_prompts, n_prompts)
    settings = learn_settings(load_recipe(args.run_dir / "recipe.yaml", [], {"run_dir": str(args.run_dir)}))
    users = np.random.default_rng(123).uniform(-1, 1, (args.users, dims))
    print(f"bank: {len(bank.points)} soups x {n_prompts} prompts ({args.learn_prompts} to ask, {len(held)} held out), "
          f"dimensions {data['axes']}; {args.users} users, {args.flip:.0%} flips")
    # how far the two yardsticks agree: the learner only sees the reward models
    corr = [np.corrcoef(bank.learner[..., d].ravel(), bank.truth[..., d].ravel())[0, 1] for d in range(dims)]
    print("reward models vs rubric, correlation per dimension: " + ", ".join(f"{c:.2f}" for c in corr))
    results = {}
    for strategy in ("active", "random"):
        started = time.perf_counter()
        results[strategy] = simulate(bank, users, picks=args.picks, strategy=strategy, flip=args.flip,
                                     learn_prompts=learn, eval_prompts=held, settings=settings)
        print(f"  {strategy}: {time.perf_counter() - started:.1f} s")
    print(f"{'picks':>5} {'err active':>10} {'err random':>10} {'bound':>6} {'win active':>10} {'win random':>10}")
    for k in [0, 1, 2, 3, 5, 10, 15, 20]:
        if k > args.picks:
            continue
        a, r = results["active"], results["random"]
        print(f"{k:>5} {a.error[:, k].mean():>10.3f} {r.error[:, k].mean():>10.3f} {bits_bound(args.flip, k, dims):>6.3f} "
              f"{a.win[:, k].mean():>10.1%} {r.win[:, k].mean():>10.1%}")
    a, r = results["active"], results["random"]
    below = all(a.error[:, k].mean() < r.error[:, k].mean() for k in range(1, args.picks + 1))
    print(f"active error below random at every pick count 1..{args.picks}: {below}")
    if args.picks >= 10:
        print(f"after 10 picks: win {a.win[:, 10].mean():.1%} (goal >= 65%), error {a.error[:, 10].mean():.3f} "
              f"(goal <= 0.25; bound {bits_bound(args.flip, 10, dims):.3f}), ratio random/active error "
              f"{r.error[:, 10].mean() / a.error[:, 10].mean():.2f}")
    if args.plot:
        from rlphf_cli.evaluation.report import _pyplot

        plt = _pyplot()
        ks = np.arange(args.picks + 1)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, res in results.items():
            ax1.plot(ks, res.error.mean(axis=0), marker="o", ms=3, label=name)
            ax2.plot(ks, res.win.mean(axis=0), marker="o", ms=3, label=name)
        ax1.plot(ks, [bits_bound(args.flip, k, dims) for k in ks], ls="--", c="grey", label="information bound")
        ax1.set(xlabel="picks", ylabel="mean abs error per dimension", title="learned vs true point")
        ax2.axhline(0.65, ls=":", c="grey")
        ax2.set(xlabel="picks", ylabel="win rate vs centre soup", title="learned soup, held-out prompts")
        for ax in (ax1, ax2):
            ax.grid(alpha=.3)
            ax.legend()
        fig.suptitle(f"{args.users} simulated users (rubric picks, {args.flip:.0%} flips), run {args.run_dir.name}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
