"""report/report.md and its figures, from the artifacts of a run directory.

Sections: the paper-style win-rate table (each system against the base model, per combination
and criterion, with 95% intervals), single-preference experts, reward-model accuracies, policy
training curves, the weight sweep between two preferences, the cost table, and the demo's bars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlphf_cli.runs import atomic_write_json, atomic_write_text, read_jsonl

EXPERT_BAR = 0.6  # an expert must beat the base model on its own criterion at least this often


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ci(summary: dict) -> str:
    if summary.get("ci_low") is None:
        return _pct(summary.get("win_rate"))
    return f"{_pct(summary['win_rate'])} [{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]"


def winrate_table(pipeline, baseline: str = "base") -> tuple[list[str], dict[str, dict]]:
    """Markdown rows: combinations x systems, each system's win rate against `baseline`."""
    from rlphf_cli.preferences import combination_name

    systems = [s for s in pipeline.systems() if s != baseline]
    results = {s: _load_json(pipeline.run.judgment(s, baseline)) for s in systems}
    results = {s: r for s, r in results.items() if r}
    if not results:
        return [], {}
    names = list(results)
    lines = [f"Win rate (%) against **{baseline}**, ties count half; [95% bootstrap interval].", "",
             "| combination | criterion | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for combo in pipeline.combos:
        name = combination_name(combo)
        for pref in combo:
            cells = [_pct(r["per_combo"].get(name, {}).get("per_criterion", {}).get(pref.id, {}).get("win_rate"))
                     for r in results.values()]
            lines.append(f"| {name} | {pref.id} ({pref.alias}) | " + " | ".join(cells) + " |")
        cells = [_ci(r["per_combo"][name]) if name in r["per_combo"] else "-" for r in results.values()]
        lines.append(f"| {name} | **all** | " + " | ".join(cells) + " |")
    lines.append("| **average** | **all** | " + " | ".join(f"**{_ci(r['overall'])}**" for r in results.values()) + " |")
    return lines, {s: r["overall"] for s, r in results.items()}


def experts_table(pipeline) -> tuple[list[str], dict[str, float | None]]:
    from rlphf_cli.pipeline import EXPERTS_SYSTEM

    result = _load_json(pipeline.run.judgment(EXPERTS_SYSTEM, "base"))
    if not result:
        return [], {}
    lines = ["Each single-preference policy, prompted with its preference, against the base model "
             "(no preference prompt), on its own criterion.", "",
             "| preference | wins | ties | losses | win rate % [95% CI] |", "|---|---:|---:|---:|---|"]
    rates = {}
    for pref in pipeline.prefs:
        s = result["per_criterion"].get(pref.id)
        if s is None:
            continue
        rates[pref.id] = s["win_rate"]
        lines.append(f"| {pref.id} ({pref.alias}) | {s['wins']} | {s['ties']} | {s['losses']} | {_ci(s)} |")
    return lines, rates


def reward_model_table(pipeline) -> list[str]:
    lines = ["| reward model | held-out accuracy | mean margin | train pairs | held-out pairs |",
             "|---|---:|---:|---:|---:|"]
    found = False
    for pref_dir in sorted(pipeline.run.path("rm").glob("*")):
        metrics = _load_json(pref_dir / "metrics.json")
        if not metrics:
            continue
        found = True
        lines.append(f"| {pref_dir.name} | {_pct(metrics.get('accuracy'))}% | {metrics.get('mean_margin', 0):.3f} | "
                     f"{metrics.get('pairs_train', '-')} | {metrics.get('pairs_eval', '-')} |")
    return lines if found else []


def _curves(pipeline, out: Path) -> list[str]:
    """reward and KL per step of every trained policy, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for policy_dir in sorted(pipeline.run.path("policy").glob("*")):
        path = policy_dir / "metrics.jsonl"
        if path.exists():
            records = [r for r in read_jsonl(path) if "reward" in r]
            if records:
                series[policy_dir.name] = records
    if not series:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, records in series.items():
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["reward"] for r in records], label=name)
        axes[1].plot(steps, [r.get("kl", float("nan")) for r in records], label=name)
    axes[0].set(title="reward-model score of sampled completions", xlabel="step", ylabel="reward")
    axes[1].set(title="KL to the base model", xlabel="step", ylabel="KL")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    first_last = [f"| {name} | {r[0]['reward']:.3f} | {r[-1]['reward']:.3f} | {r[-1].get('kl', float('nan')):.4f} |"
                  for name, r in series.items()]
    return ["| policy | reward (first step) | reward (last step) | KL (last step) |", "|---|---:|---:|---:|",
            *first_last, "", f"![training curves]({out.name})"]


def sweep_points(pipeline) -> list[dict]:
    """Mean rubric measure of both sweep preferences for each weight's soup outputs."""
    from rlphf_cli.judges.rubric import has_measure, measure
    from rlphf_cli.pipeline import SWEEP_SYSTEM

    if not pipeline.recipe.evaluation.sweep:
        return []
    a, b = pipeline.sweep_prefs()
    if not (has_measure(a) and has_measure(b)):
        return []
    points = []
    for weight in pipeline.sweep_weights():
        path = pipeline.run.generations(SWEEP_SYSTEM, f"w{weight:g}")
        if not path.exists():
            continue
        texts = [r["response"] for r in read_jsonl(path)]
        points.append({"weight": weight, a.id: sum(measure(a, t) for t in texts) / len(texts),
                       b.id: sum(measure(b, t) for t in texts) / len(texts), "n": len(texts)})
    return points


def _monotone(values: list[float]) -> bool:
    steps = [y - x for x, y in zip(values, values[1:], strict=False)]
    return all(d >= 0 for d in steps) or all(d <= 0 for d in steps)


def _sweep(pipeline, out: Path) -> tuple[list[str], bool | None]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlphf_cli.judges.rubric import measure_name

    points = sweep_points(pipeline)
    if len(points) < 2:
        return [], None
    a, b = pipeline.sweep_prefs()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    weights = [p["weight"] for p in points]
    axes[0].plot(weights, [p[a.id] for p in points], "o-")
    axes[0].set(title=f"{measure_name(a)} vs weight on {a.id} ({a.alias})", xlabel=f"weight on {a.id}",
                ylabel=f"{a.id} measure (higher = more {a.alias})")
    axes[1].plot([p[a.id] for p in points], [p[b.id] for p in points], "o-")
    for p in points:
        axes[1].annotate(f"w={p['weight']:g}", (p[a.id], p[b.id]), fontsize=8)
    axes[1].set(title="the front between the two preferences", xlabel=f"{a.id} ({a.alias}) measure",
                ylabel=f"{b.id} ({b.alias}) measure")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    monotone = _monotone([p[a.id] for p in points])
    lines = [f"Soups `{a.id}` x w + `{b.id}` x (1 - w) ({pipeline.recipe.merge.method}-merged policies), "
             f"no preference prompt, on the evaluation prompts; rubric measures (mean over {points[0]['n']} prompts).",
             "", f"| weight on {a.id} | {a.id} measure ({measure_name(a)}) | {b.id} measure ({measure_name(b)}) |",
             "|---:|---:|---:|",
             *[f"| {p['weight']:g} | {p[a.id]:.3f} | {p[b.id]:.3f} |" for p in points],
             "", f"Monotone in the weight: **{'yes' if monotone else 'no'}**.", "", f"![weight sweep]({out.name})"]
    return lines, monotone


def cost_table(pipeline) -> list[str]:
    walls: dict[str, float] = {}
    for event in pipeline.run.events():
        if event.get("event") == "end" and event.get("stage") in [s for s in pipeline.stages()]:
            walls[event["stage"]] = walls.get(event["stage"], 0.0) + float(event.get("wall_s", 0.0))
    requests = tokens = 0
    for summary_path in pipeline.run.path("annotations").glob("*.summary.json"):
        summary = _load_json(summary_path) or {}
        requests += int(summary.get("requests", 0))
        tokens += int(summary.get("tokens", 0) or 0)
    for judgment_path in pipeline.run.path("judgments").glob("*.json"):
        stats = (_load_json(judgment_path) or {}).get("stats", {})
        requests += int(stats.get("requests", 0))
        tokens += int(stats.get("prompt_tokens", 0)) + int(stats.get("completion_tokens", 0))
    lines = ["| stage | wall time (s, last runs) |", "|---|---:|"]
    lines += [f"| {stage} | {wall:.1f} |" for stage, wall in walls.items()]
    lines += ["", f"Judge requests: {requests}; judge tokens: {tokens} (the rubric judge makes no paid request)."]
    return lines


def write_report(pipeline) -> dict[str, Any]:
    """Write report/report.md, report/summary.json and the figures; return the summary."""
    out_dir = pipeline.run.report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = pipeline.recipe
    summary: dict[str, Any] = {}
    lines = [f"# Personalized Soups: {recipe.name}", "",
             f"Base model `{recipe.model.name}`, preferences {', '.join(p.id for p in pipeline.prefs)}, "
             f"policies trained with `{recipe.train_policy.algo}`, soups merged with `{recipe.merge.method}`, "
             f"judged by `{recipe.judge.backend}`"
             + (" (a rule-based proxy: readability grade, word counts, sentiment)" if recipe.judge.backend == "rubric"
                else "") + ".", ""]

    table, overall = winrate_table(pipeline, "base")
    if table:
        lines += ["## Win rate against the base model", "", *table, ""]
        summary["overall_vs_base"] = overall
    for baseline in recipe.evaluation.baselines:
        if baseline == "base":
            continue
        result = _load_json(pipeline.run.judgment("psoups", baseline))
        if result:
            lines += [f"P-Soups against **{baseline}**: win rate {_ci(result['overall'])}%.", ""]
            summary[f"psoups_vs_{baseline}"] = result["overall"]

    table, expert_rates = experts_table(pipeline)
    if table:
        lines += ["## Single-preference experts", "", *table, ""]
        summary["experts_vs_base"] = expert_rates

    table = reward_model_table(pipeline)
    if table:
        lines += ["## Reward models", "", "Pairwise accuracy on held-out annotated pairs.", "", *table, ""]

    table = _curves(pipeline, out_dir / "training_curves.png")
    if table:
        lines += ["## Policy training", "", *table, ""]

    table, monotone = _sweep(pipeline, out_dir / "sweep.png")
    if table:
        lines += ["## Weight sweep", "", *table, ""]
        summary["sweep"] = sweep_points(pipeline)
        summary["sweep_monotone"] = monotone

    lines += ["## Cost", "", *cost_table(pipeline), ""]

    warnings = meaningless_reasons(recipe)
    bars = [] if warnings else demo_bars(summary)  # checks on meaningless numbers would mislead
    if bars:
        lines += ["## Checks", "", "| check | result |", "|---|---|",
                  *[f"| {name} | {'pass' if ok else 'FAIL'} ({detail}) |" for name, ok, detail in bars], ""]
        summary["checks"] = [{"check": name, "pass": ok, "detail": detail} for name, ok, detail in bars]
    if warnings:  # at the top, under the title
        lines[2:2] = [f"> **WARNING: {w}.**\n" for w in warnings]
        summary["warnings"] = warnings
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    atomic_write_json(out_dir / "summary.json", summary)
    return {"report": str(out_dir / "report.md"), "checks": summary.get("checks", [])}


def demo_bars(summary: dict) -> list[tuple[str, bool, str]]:
    """The results a run should show: experts beat base, soups beat prompting, the sweep steers."""
    bars = []
    for pref, rate in summary.get("experts_vs_base", {}).items():
        bars.append((f"expert {pref} beats base on {pref}", rate is not None and rate > EXPERT_BAR,
                     f"win rate {_pct(rate)}% > {100 * EXPERT_BAR:.0f}%"))
    overall = summary.get("overall_vs_base", {})
    if "psoups" in overall and "prompted" in overall:
        ours, theirs = overall["psoups"]["win_rate"], overall["prompted"]["win_rate"]
        bars.append(("P-Soups beats preference prompting (average win rate vs base)",
                     ours is not None and theirs is not None and ours > theirs,
                     f"{_pct(ours)}% vs {_pct(theirs)}%"))
    if summary.get("sweep_monotone") is not None:
        bars.append(("weight sweep is monotone", bool(summary["sweep_monotone"]), "rubric measure vs weight"))
    return bars


def meaningless_reasons(recipe) -> list[str]:
    """Why a run's numbers mean nothing, if they do not: said at the top of report.md and by `rlphf run`."""
    from rlphf_cli.judges import COIN
    from rlphf_cli.models import builtin_model

    reasons = []
    model = builtin_model(recipe.model.name)
    if model is not None and model.random_weights:
        reasons.append(f"the base model {model.name} has random weights: a smoke run, its numbers mean nothing")
    coin = [use for use, backend in (("annotation", recipe.annotate.judge), ("evaluation", recipe.judge.backend))
            if backend == COIN]
    if coin:
        reasons.append(f"the {COIN} judge decided {' and '.join(coin)} by a hash of the prompt, not by reading it: "
                       "every label, reward model and win rate here is meaningless")
    return reasons
