"""report/report.md and its figures, from the artifacts of a run directory.

Sections: how the numbers were made; the paper's comparison (every system against the base model
per combination, with 95% intervals, and its figure); P-Soups head to head against each system;
the per-criterion detail; the single-preference experts; reward models; policy training; the
weight sweep; the cost of each system; the checks a run should pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlphf_cli.runs import atomic_write_json, atomic_write_text, read_jsonl
from rlphf_cli.systems import BASE, EXPERTS, PARETO_METHODS, PROMPTED, PSOUPS, PSOUPS_DECODING, SWEEP, label

EXPERT_BAR = 0.6  # an expert must beat the base model given its preference prompt at least this often


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _ci(summary: dict | None) -> str:
    if not summary:
        return "-"
    if summary.get("ci_low") is None:
        return _pct(summary.get("win_rate"))
    return f"{_pct(summary['win_rate'])} [{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _judgments(pipeline, *, against: str | None = None, of: str | None = None) -> dict[str, dict]:
    """The judgment files of every other system `against` one (keyed by system), or `of` one
    system against every other (keyed by the other), for those that exist."""
    center = against or of
    pairs = {s: (s, center) if against else (center, s) for s in pipeline.systems() if s != center}
    found = {s: _load_json(pipeline.run.judgment(*pair)) for s, pair in pairs.items()}
    return {s: r for s, r in found.items() if r}


# --------------------------------------------------------------------------------------------
# Sections


def setup_lines(pipeline) -> list[str]:
    """How every win rate below was made: n, samples, temperature, judge, the both-orders rule."""
    recipe = pipeline.recipe
    any_result = next(iter(_judgments(pipeline, against=BASE).values()), None)
    n = any_result["pairs"] if any_result else "?"
    judge = recipe.judge.backend + (" (a rule-based proxy: readability grade, word counts, sentiment)"
                                    if recipe.judge.backend == "rubric" else "")
    order_rule = ("each pair is judged in both orders; a win or a loss needs both to agree, a disagreement is a tie"
                  if recipe.judge.both_orders else "each pair is judged once, in one order")
    temperature = "greedy" if recipe.generate.temperature == 0 else f"temperature {recipe.generate.temperature:g}"
    return [f"Base model `{recipe.model.name}`, preferences {', '.join(p.id for p in pipeline.prefs)}; experts "
            f"trained with `{recipe.train_policy.algo}`, soups merged with `{recipe.merge.method}`. Every win rate "
            f"below: {n} (prompt, combination) records per system ({len(pipeline.combos)} combinations), one answer "
            f"per prompt ({temperature}, up to {recipe.generate.max_new_tokens} tokens), judged by `{judge}` on each "
            f"preference of the combination; {order_rule}; ties count half; [95% bootstrap interval] resampling "
            f"prompts, each with all its combinations and criteria ({recipe.judge.bootstrap_samples} resamples).", "",
            *_model_lines(recipe.model.name)]


def _model_lines(name: str) -> list[str]:
    """What a built-in base model is (for gemma-3-270m-sft: the SFT stage before everything)."""
    from rlphf_cli.models import builtin_model

    builtin = builtin_model(name)
    return [f"`{name}`: {builtin.description}.", ""] if builtin else []


def comparison_table(pipeline, figure: Path) -> tuple[list[str], dict[str, dict]]:
    """The paper's table: combinations as rows, systems as columns, win rate against the base model."""
    from rlphf_cli.preferences import combination_name

    results = _judgments(pipeline, against=BASE)
    if not results:
        return [], {}
    header = "| combination | " + " | ".join(label(s) for s in results) + " |"
    lines = ["Win rate (%) of each system against the base model (no preference prompt) on the criteria of "
             "each combination.", "", header, "|---|" + "---:|" * len(results)]
    for combo in pipeline.combos:
        name = combination_name(combo)
        lines.append(f"| {name} | " + " | ".join(_ci(r["per_combo"].get(name)) for r in results.values()) + " |")
    lines.append("| **average** | " + " | ".join(f"**{_ci(r['overall'])}**" for r in results.values()) + " |")
    _comparison_figure(results, figure)
    return lines + ["", f"![average win rate per system]({figure.name})"], {s: r["overall"] for s, r in results.items()}


def _comparison_figure(results: dict[str, dict], out: Path) -> None:
    plt = _pyplot()
    systems = list(results)
    rates = [100 * results[s]["overall"]["win_rate"] for s in systems]
    lows = [100 * (results[s]["overall"].get("ci_low") or results[s]["overall"]["win_rate"]) for s in systems]
    highs = [100 * (results[s]["overall"].get("ci_high") or results[s]["overall"]["win_rate"]) for s in systems]
    fig, ax = plt.subplots(figsize=(1.4 * len(systems) + 2, 3.6))
    ax.bar(range(len(systems)), rates, color=["tab:orange" if s == PSOUPS else "tab:blue" for s in systems],
           yerr=[[r - lo for r, lo in zip(rates, lows, strict=True)], [hi - r for r, hi in zip(rates, highs, strict=True)]],
           capsize=4)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(systems)), [label(s) for s in systems], fontsize=8)
    ax.set(ylabel="win rate vs base (%)", title="average win rate against the base model, 95% intervals")
    ax.set_ylim(max(0, min(lows) - 10), min(100, max(highs) + 10))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def head_to_head(pipeline) -> tuple[list[str], dict[str, dict]]:
    """P-Soups against each other system directly, and where that puts it (the interval decides)."""
    results = _judgments(pipeline, of=PSOUPS)
    if not results:
        return [], {}
    lines = ["| P-Soups against | win rate % [95% CI] | wins / ties / losses | P-Soups is |", "|---|---|---|---|"]
    for other, r in results.items():
        o = r["overall"]
        lines.append(f"| {label(other)} | {_ci(o)} | {o['wins']} / {o['ties']} / {o['losses']} | {_standing(o)} |")
    lines += ["", "Ahead of / behind: the whole 95% interval is above / below 50%; level with: it holds 50%."]
    return lines, {s: r["overall"] for s, r in results.items()}


def _standing(summary: dict) -> str:
    """Where P-Soups stands against a system, by the interval of its head-to-head win rate."""
    low, high = summary.get("ci_low"), summary.get("ci_high")
    if low is not None and low > 0.5:
        return "ahead of"
    if high is not None and high < 0.5:
        return "behind"
    return "level with"


def paper_agreement(h2h: dict[str, dict], vs_base: dict[str, dict]) -> list[str]:
    """One paragraph: the paper's finding and whether this run agrees, from the intervals."""
    if not h2h:
        return []
    by: dict[str, list[str]] = {}
    for other, s in h2h.items():
        by.setdefault(_standing(s), []).append(label(other))
    parts = [f"{k} {', '.join(v)}" for k, v in by.items()]
    single = [s for s in ("rlhf", PROMPTED, "multitask") if s in h2h]
    agrees = bool(single) and all(h2h[s].get("ci_low") is not None and h2h[s]["ci_low"] > 0.5 for s in single)
    text = (f"The paper (GPT-4 judge) found P-Soups and P-MORL ahead of the single-objective baselines. In this run "
            f"P-Soups is {'; '.join(parts)} (head to head, 95% intervals), so on P-Soups against "
            f"{', '.join(label(s) for s in single) or 'the single-objective baselines'} it "
            f"{'agrees' if agrees else 'does not fully agree'}.")
    if "morl" in vs_base:
        text += f" P-MORL's average win rate against the base model is {_ci(vs_base['morl'])}%."
    return [text, ""]


def criterion_table(pipeline) -> list[str]:
    """Per combination and criterion, every system against the base model, with intervals."""
    from rlphf_cli.preferences import combination_name

    results = _judgments(pipeline, against=BASE)
    if not results:
        return []
    lines = ["| combination | criterion | " + " | ".join(label(s) for s in results) + " |",
             "|---|---|" + "---:|" * len(results)]
    for combo in pipeline.combos:
        name = combination_name(combo)
        for pref in combo:
            cells = [_ci(r["per_combo"].get(name, {}).get("per_criterion", {}).get(pref.id)) for r in results.values()]
            lines.append(f"| {name} | {pref.id} ({pref.alias}) | " + " | ".join(cells) + " |")
    return lines


def experts_table(pipeline) -> tuple[list[str], dict[str, dict], dict[str, float | None]]:
    """Each expert against the base model given the same preference prompt (the expert check: what
    training adds over prompting) and against the unprompted base model."""
    prompted = _load_json(pipeline.run.judgment(EXPERTS, PROMPTED)) or {}
    plain = _load_json(pipeline.run.judgment(EXPERTS, BASE)) or {}
    if not prompted and not plain:
        return [], {}, {}
    lines = ["Each single-preference policy, prompted with its preference, on its own criterion, against "
             "the base model given **the same preference prompt** (what training adds over prompting; the "
             f"check: above {100 * EXPERT_BAR:.0f}%) and against the base model without a prompt. "
             "Win rate % [95% CI] (wins / ties / losses).", "",
             "| preference | vs prompted base | vs base (no prompt) |", "|---|---|---|"]
    vs_prompted, vs_plain = {}, {}
    for pref in pipeline.prefs:
        a = prompted.get("per_criterion", {}).get(pref.id)
        b = plain.get("per_criterion", {}).get(pref.id)
        if a is None and b is None:
            continue
        if a is not None:
            vs_prompted[pref.id] = {k: a[k] for k in ("win_rate", "ci_low", "ci_high", "n")}
        vs_plain[pref.id] = b["win_rate"] if b else None
        cells = [f"{_ci(s)} ({s['wins']}/{s['ties']}/{s['losses']})" if s else "-" for s in (a, b)]
        lines.append(f"| {pref.id} ({pref.alias}) | " + " | ".join(cells) + " |")
    return lines, vs_prompted, vs_plain


def side_by_side(pipeline, prompts: int = 2) -> list[str]:
    """The first held-out prompts' answers from the base model, preference prompting, each expert and
    P-Soups, one table per prompt: what the numbers above look like."""
    from rlphf_cli.preferences import combination_name
    from rlphf_cli.systems import BASE_PLAIN

    base = pipeline.run.generations(BASE, BASE_PLAIN)
    if not base.is_file():
        return []
    sources = [("base model (no preference prompt)", base)]
    for combo in pipeline.combos:
        name = combination_name(combo)
        sources += [(f"{label(PROMPTED)} {name}", pipeline.run.generations(PROMPTED, name)),
                    (f"{label(PSOUPS)} {name}", pipeline.run.generations(PSOUPS, name))]
    sources += [(f"expert {p.id} ({p.alias})", pipeline.run.generations(EXPERTS, p.id)) for p in pipeline.prefs]
    answers = {title: {r["id"]: r["response"] for r in read_jsonl(path)} for title, path in sources if path.is_file()}
    lines = []
    for record in read_jsonl(base)[:prompts]:
        lines += [f"**{record['instruction']}** (each system given its preference prompts; the base model none)", "",
                  "| system | answer |", "|---|---|"]
        for title, by_id in answers.items():
            text = by_id.get(record["id"])
            if text is not None:
                lines.append(f"| {title} | {' '.join(text.split()).replace('|', '&#124;')} |")
        lines.append("")
    return lines


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
    """Each policy's reward relative to its own start (reward models have unrelated scales), and KL."""
    series = {}
    for policy_dir in sorted(pipeline.run.path("policy").glob("*")):
        path = policy_dir / "metrics.jsonl"
        if path.exists():
            records = [r for r in read_jsonl(path) if "reward" in r]
            if records:
                series[policy_dir.name] = records
    if not series:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, records in series.items():
        steps = [r["step"] for r in records]
        start = sum(r["reward"] for r in records[:3]) / len(records[:3])
        axes[0].plot(steps, [r["reward"] - start for r in records], label=name)
        axes[1].plot(steps, [r.get("kl", float("nan")) for r in records], label=name)
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].set(title="reward gain over the first 3 steps (own reward model)", xlabel="step",
                ylabel="reward - initial reward")
    axes[1].set(title="KL to the base model (mean per token, sampled tokens)", xlabel="step", ylabel="KL")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    rows = []
    for name in series:
        t = _load_json(pipeline.run.policy(name) / "training.json") or {}
        rows.append(f"| {name} | {_num(t.get('reward_start'))} → {_num(t.get('reward_end'))} | {_num(t.get('kl_end'), 4)} | "
                    f"{_num(t.get('completion_length_start'), 1)} → {_num(t.get('completion_length_end'), 1)} | "
                    f"{_pct(t.get('clipped_ratio_mean'))}% |")
    return ["Reward, KL and length: means of the first and of the last 3 logged steps (each policy's reward is "
            "on its own reward model's scale). KL: TRL's estimate against the base model (the adapter switched "
            "off), log-ratio of the sampled tokens averaged per token. Clipped: share of the sampled completions "
            "cut at max_completion_length, over all steps (left out of the loss when mask_truncated_completions "
            "is on, the default).", "",
            "| policy | reward start → end | KL end | completion tokens start → end | clipped |",
            "|---|---:|---:|---:|---:|", *rows, "", f"![training curves]({out.name})"]


def _display_measure(pref) -> tuple[str, float]:
    """The rubric measure as it is named: 'minus word count' is shown as the word count."""
    from rlphf_cli.judges.rubric import measure_name

    name = measure_name(pref)
    return (name.removeprefix("minus "), -1.0) if name.startswith("minus ") else (name, 1.0)


def sweep_points(pipeline) -> list[dict]:
    """Per weight: mean and 95% interval of both sweep preferences' measures, as named."""
    from rlphf_cli.evaluation.winrate import bootstrap_ci
    from rlphf_cli.judges.rubric import has_measure, measure

    if not pipeline.recipe.evaluation.sweep:
        return []
    a, b = pipeline.sweep_prefs()
    if not (has_measure(a) and has_measure(b)):
        return []
    points = []
    for weight in pipeline.sweep_weights():
        path = pipeline.run.generations(SWEEP, f"w{weight:g}")
        if not path.exists():
            continue
        texts = [r["response"] for r in read_jsonl(path)]
        point: dict[str, Any] = {"weight": weight, "n": len(texts)}
        for pref in (a, b):
            sign = _display_measure(pref)[1]
            values = [sign * measure(pref, t) for t in texts]
            low, high = bootstrap_ci([[v] for v in values], 1000, pipeline.recipe.seed)
            point[pref.id] = {"mean": sum(values) / len(values), "ci_low": low, "ci_high": high}
        points.append(point)
    return points


def _monotone(values: list[float]) -> bool:
    steps = [y - x for x, y in zip(values, values[1:], strict=False)]
    return all(d >= 0 for d in steps) or all(d <= 0 for d in steps)


def _sweep(pipeline, out: Path) -> tuple[list[str], bool | None, list[dict]]:
    points = sweep_points(pipeline)
    if len(points) < 2:
        return [], None, points
    a, b = pipeline.sweep_prefs()
    (name_a, _), (name_b, _) = _display_measure(a), _display_measure(b)
    n = points[0]["n"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    weights = [p["weight"] for p in points]
    for ax, pref, name in ((axes[0], a, name_a), (axes[1], b, name_b)):
        means = [p[pref.id]["mean"] for p in points]
        ax.errorbar(weights, means, yerr=[[m - p[pref.id]["ci_low"] for m, p in zip(means, points, strict=True)],
                                          [p[pref.id]["ci_high"] - m for m, p in zip(means, points, strict=True)]],
                    fmt="o-", capsize=3)
        ax.set(title=f"{name} ({pref.id} {pref.alias} measure)", xlabel=f"weight on {a.id} ({a.alias})", ylabel=name)
    fig.suptitle(f"soups {a.id} x w + {b.id} x (1 - w), no preference prompt; mean and 95% interval over "
                 f"n = {n} prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    monotone = _monotone([p[a.id]["mean"] for p in points])
    lines = [f"Soups `{a.id}` x w + `{b.id}` x (1 - w) (`average`-merged policies), no preference prompt, on the "
             f"evaluation prompts: rubric measures, mean [95% bootstrap interval] over n = {n} prompts.", "",
             f"| weight on {a.id} | {name_a} ({a.id}) | {name_b} ({b.id}) |", "|---:|---:|---:|",
             *[f"| {p['weight']:g} | {_measure_ci(p[a.id])} | {_measure_ci(p[b.id])} |" for p in points],
             "", f"Monotone in the weight: **{'yes' if monotone else 'no'}**.", "", f"![weight sweep]({out.name})"]
    return lines, monotone, points


def _scored(pipeline, path: Path, prefs) -> dict[str, Any]:
    """Mean and 95% bootstrap interval of each preference's rubric measure (as named) over a file's answers."""
    from rlphf_cli.evaluation.winrate import bootstrap_ci
    from rlphf_cli.judges.rubric import measure

    texts = [r["response"] for r in read_jsonl(path)]
    point: dict[str, Any] = {"n": len(texts)}
    for pref in prefs:
        sign = _display_measure(pref)[1]
        values = [sign * measure(pref, t) for t in texts]
        low, high = bootstrap_ci([[v] for v in values], 1000, pipeline.recipe.seed)
        point[pref.id] = {"mean": sum(values) / len(values), "ci_low": low, "ci_high": high}
    return point


def _judged(path: Path, prefs) -> dict[str, Any]:
    """A front point judged against the base model: each criterion's win rate and interval, in %."""
    result = _load_json(path) or {}
    point: dict[str, Any] = {"n": result.get("pairs")}
    for pref in prefs:
        s = (result.get("per_criterion") or {}).get(pref.id)
        point[pref.id] = None if not s or s.get("win_rate") is None else {
            "mean": 100 * s["win_rate"], "ci_low": 100 * s["ci_low"], "ci_high": 100 * s["ci_high"]}
    return point


def _dominates(x: dict, y: dict, prefs, signs) -> bool:
    """x's interval beyond y's on one measure (in the direction the preference wants) and not behind on
    the other."""
    ahead = behind = False
    for pref, sign in zip(prefs, signs, strict=True):
        lo_x, hi_x = sorted((sign * x[pref.id]["ci_low"], sign * x[pref.id]["ci_high"]))
        lo_y, hi_y = sorted((sign * y[pref.id]["ci_low"], sign * y[pref.id]["ci_high"]))
        ahead |= lo_x > hi_y
        behind |= hi_x < lo_y
    return ahead and not behind


def pareto(pipeline, out: Path) -> tuple[list[str], dict]:
    """The pareto stage's fronts on one figure, a table, and which front dominates where."""
    if not pipeline.recipe.evaluation.pareto:
        return [], {}
    prefs = pipeline.pareto_prefs()
    judged = pipeline.pareto_judged()
    fronts = {method: [{"weight": w, **(_judged(pipeline.pareto_judgment(method, w), prefs) if judged
                                        else _scored(pipeline, path, prefs))}
                       for w, path in points if path.exists()]
              for method, points in pipeline.pareto_outputs().items()}
    if not all(fronts.values()) or any(None in (p.get(pref.id) for pref in prefs) for f in fronts.values() for p in f):
        return [], {}
    a, b = prefs
    if judged:
        (name_a, sign_a), (name_b, sign_b) = ("win rate vs base %", 1.0), ("win rate vs base %", 1.0)
        scored_by = (f"Win rate % against the base model's answers (no preference prompt) on each criterion, by the "
                     f"'{pipeline.recipe.judge.backend}' judge, [95% bootstrap interval].")
    else:
        (name_a, sign_a), (name_b, sign_b) = _display_measure(a), _display_measure(b)
        scored_by = "Rubric measures, mean [95% bootstrap interval]."
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method, points in fronts.items():
        xs, ys = [p[a.id]["mean"] for p in points], [p[b.id]["mean"] for p in points]
        ax.errorbar(xs, ys, xerr=[[x - p[a.id]["ci_low"] for x, p in zip(xs, points, strict=True)],
                                  [p[a.id]["ci_high"] - x for x, p in zip(xs, points, strict=True)]],
                    yerr=[[y - p[b.id]["ci_low"] for y, p in zip(ys, points, strict=True)],
                          [p[b.id]["ci_high"] - y for y, p in zip(ys, points, strict=True)]],
                    fmt="o-", capsize=2, label=PARETO_METHODS[method])
        for x, y, p in zip(xs, ys, points, strict=True):
            ax.annotate(f"{p['weight']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=f"{name_a} ({a.id} {a.alias})", ylabel=f"{name_b} ({b.id} {b.alias})",
           title=f"weight w on {a.id}, 1 - w on {b.id}; mean and 95% interval, n = {fronts['pareto-params'][0]['n']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    lines = [f"Between `{a.id}` ({a.alias}) at weight w and `{b.id}` ({b.alias}) at 1 - w, on the evaluation "
             "prompts: parameter soups (`average`), decoding-time mixes (Σ w_i log p_i), and the base model "
             f"prompted alone (w >= 0.75: {a.id}'s prompt; w <= 0.25: {b.id}'s; between: both). {scored_by}", "",
             f"| method | w | {name_a} ({a.id}) | {name_b} ({b.id}) |", "|---|---:|---:|---:|"]
    for method, points in fronts.items():
        lines += [f"| {PARETO_METHODS[method]} | {p['weight']:g} | {_measure_ci(p[a.id])} | {_measure_ci(p[b.id])} |"
                  for p in points]
    soups, mixes = fronts["pareto-params"], fronts["pareto-logits"]
    # Displayed measures grow with the preference, except the "minus" ones shown flipped (word count).
    want = (sign_a, sign_b)
    by_weight = {p["weight"]: p for p in mixes}
    soup_wins = [p["weight"] for p in soups if p["weight"] in by_weight and _dominates(p, by_weight[p["weight"]], prefs, want)]
    mix_wins = [p["weight"] for p in soups if p["weight"] in by_weight and _dominates(by_weight[p["weight"]], p, prefs, want)]

    def where(ws):
        return f"at w = {', '.join(f'{w:g}' for w in ws)}" if ws else "at no weight"

    sentence = (f"From the intervals, at equal weights the parameter soup dominates the decoding-time mix "
                f"{where(soup_wins)} and the mix dominates the soup {where(mix_wins)}; elsewhere their "
                "intervals overlap on a measure and neither front dominates.")
    lines += ["", sentence, "", f"![pareto front]({out.name})"]
    return lines, {"fronts": fronts, "soup_dominates_at": soup_wins, "mix_dominates_at": mix_wins}


def _measure_ci(value: dict) -> str:
    return f"{value['mean']:.1f} [{value['ci_low']:.1f}, {value['ci_high']:.1f}]"


def system_costs(pipeline) -> list[str]:
    """Per system: what was trained for it and how long it took, and what one policy per combination
    would have cost instead."""
    from rlphf_cli.preferences import combination_name

    run = pipeline.run

    def rm_seconds(ids) -> float:
        return sum((_load_json(run.reward_model(i) / "metrics.json") or {}).get("train_s", 0.0) for i in ids)

    def policy_seconds(name: str) -> float:
        return (_load_json(run.policy(name) / "training.json") or {}).get("wall_s", 0.0)

    prefs = [p.id for p in pipeline.prefs]
    expert_s = [policy_seconds(p) for p in prefs]
    merge_s = sum((_load_json(run.soup(combination_name(c)) / "soup.json") or {}).get("seconds", 0.0)
                  for c in pipeline.combos)
    rows = {
        PSOUPS: (len(prefs), len(prefs), rm_seconds(prefs) + sum(expert_s) + merge_s,
                 f"{len(prefs)} experts, {len(pipeline.combos)} soups merged in {merge_s:.2f} s"),
        PSOUPS_DECODING: (len(prefs), len(prefs), rm_seconds(prefs) + sum(expert_s),
                          "P-Soups' experts, nothing merged: every expert decodes each token"),
        "morl": (len(prefs), 1, rm_seconds(prefs) + policy_seconds("morl"), "one policy, reward models shared with P-Soups"),
        "rlhf": (1, 1, rm_seconds(["general"]) + policy_seconds("rlhf"), "one policy, not personalized"),
        "multitask": (0, 1, policy_seconds("multitask"), "one policy, SFT on the annotations"),
        PROMPTED: (0, 0, 0.0, "no training"),
        BASE: (0, 0, 0.0, "no training"),
    }
    lines = ["Training wall time from the run's own records (reward models + policies; annotation and "
             "evaluation are shared). With k preference dimensions of two preferences each there are 2^k "
             "combinations.", "", "| system | reward models | policies | training (s) | for all combinations |",
             "|---|---:|---:|---:|---|"]
    for system in pipeline.systems():
        rms, policies, seconds, note = rows.get(system, (0, 0, 0.0, ""))
        lines.append(f"| {label(system)} | {rms} | {policies} | {seconds:.1f} | {note} |")
    if any(expert_s):
        mean = sum(expert_s) / len(expert_s)
        n = len(pipeline.combos)
        lines += ["", f"One policy per combination instead (no merging): {n} policies, about {n} x {mean:.1f} s = "
                  f"{n * mean:.1f} s of RL (the mean expert's time), and twice as many each time a dimension is "
                  f"added; P-Soups adds two experts per dimension."]
    return lines


def decoding_costs(pipeline) -> tuple[list[str], dict]:
    """P-Soups merged against mixed at decoding time: forwards and tokens/s per generated token, from
    this run's own evaluation units (the generation summaries their markers keep)."""
    from rlphf_cli.preferences import combination_name

    if PSOUPS_DECODING not in pipeline.systems():
        return [], {}
    out = {}
    for system, forwards in ((PSOUPS, 1), (PSOUPS_DECODING, len(pipeline.combos[0]) if pipeline.combos else 0)):
        tokens = seconds = 0.0
        for combo in pipeline.combos:
            result = (pipeline.run.marker(f"evaluate/{system}/{combination_name(combo)}") or {}).get("result") or {}
            tokens += result.get("tokens", 0)
            seconds += result.get("seconds", 0.0)
        out[system] = {"forwards_per_token": forwards, "tokens": int(tokens), "seconds": round(seconds, 2),
                       "tokens_per_s": round(tokens / seconds, 1) if seconds else None}
    lines = ["Per generated token, measured in this run's evaluation (every combination's answers): a soup is "
             "merged into the weights and decodes as one model; the decoding-time mix runs every expert "
             "(one row each) at every step.", "",
             "| system | forwards per token | tokens | seconds | tokens/s |", "|---|---:|---:|---:|---:|"]
    for system, row in out.items():
        lines.append(f"| {label(system)} | {row['forwards_per_token']} | {row['tokens']} | {row['seconds']:.1f} | "
                     f"{_num(row['tokens_per_s'], 1) if row['tokens_per_s'] else '-'} |")
    return lines, out


def stage_costs(pipeline) -> list[str]:
    walls: dict[str, float] = {}
    for event in pipeline.run.events():
        if event.get("event") == "end" and event.get("stage") in pipeline.stages():
            walls[event["stage"]] = walls.get(event["stage"], 0.0) + float(event.get("wall_s", 0.0))
    lines = ["| stage | wall time (s, last runs) |", "|---|---:|"]
    lines += [f"| {stage} | {wall:.1f} |" for stage, wall in walls.items()]
    recipe = pipeline.recipe
    judged = {"annotate": (recipe.annotate.judge, [_load_json(p) or {} for p in
                                                  sorted(pipeline.run.path("annotations").glob("*.summary.json"))]),
              "judge": (recipe.judge.backend, [_load_json(p) or {} for p in
                                               sorted(pipeline.run.path("judgments").glob("*.json"))])}
    lines += ["", "| judged stage | judge | requests (last runs) | input tokens | output tokens | cost (USD) |",
              "|---|---|---:|---:|---:|---:|"]
    for stage, (backend, records) in judged.items():
        costs = [r.get("cost") or {} for r in records]
        requests = sum(int(r.get("requests", (r.get("stats") or {}).get("requests", 0))) for r in records)
        spent = [c.get("usd") for c in costs]
        usd = "-" if not costs or None in spent else f"{sum(spent):.4f}"
        lines.append(f"| {stage} | {backend} | {requests} | {sum(c.get('prompt_tokens', 0) for c in costs)} | "
                     f"{sum(c.get('completion_tokens', 0) for c in costs)} | {usd} |")
    lines += ["", "Tokens and cost: the answers behind each stage's verdicts, cached ones included (whichever run "
              "asked them), at `judge.<backend>.price`; `-` without a price. The rubric judge makes no paid request."]
    return lines


# --------------------------------------------------------------------------------------------
# The report


def write_report(pipeline) -> dict[str, Any]:
    """Write report/report.md, report/summary.json and the figures; return the summary."""
    out_dir = pipeline.run.report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = pipeline.recipe
    summary: dict[str, Any] = {}
    lines = [f"# Personalized Soups: {recipe.name}", "", *setup_lines(pipeline)]

    table, vs_base = comparison_table(pipeline, out_dir / "systems_vs_base.png")
    if table:
        lines += ["## The comparison: every system against the base model", "", *table, ""]
        summary["overall_vs_base"] = vs_base
    table, h2h = head_to_head(pipeline)
    if table:
        lines += ["## P-Soups head to head", "", *table, "", *paper_agreement(h2h, vs_base)]
        summary["psoups_head_to_head"] = h2h
    table = criterion_table(pipeline)
    if table:
        lines += ["## Per combination and criterion (against the base model)", "", *table, ""]

    table, vs_prompted, vs_plain = experts_table(pipeline)
    if table:
        lines += ["## Single-preference experts", "", *table, ""]
        summary["experts_vs_prompted"] = vs_prompted
        summary["experts_vs_base"] = vs_plain

    table = side_by_side(pipeline)
    if table:
        lines += ["## Answers side by side", "", *table]

    table = reward_model_table(pipeline)
    if table:
        lines += ["## Reward models", "", "Pairwise accuracy on held-out annotated pairs.", "", *table, ""]

    table = _curves(pipeline, out_dir / "training_curves.png")
    if table:
        lines += ["## Policy training", "", *table, ""]

    table, monotone, points = _sweep(pipeline, out_dir / "sweep.png")
    if table:
        lines += ["## Weight sweep", "", *table, ""]
        summary["sweep"] = points
        summary["sweep_monotone"] = monotone

    table, front = pareto(pipeline, out_dir / "pareto.png")
    if table:
        lines += ["## Pareto front", "", *table, ""]
        summary["pareto"] = front

    lines += ["## Cost", "", *system_costs(pipeline), ""]
    table, decoding = decoding_costs(pipeline)
    if table:
        lines += [*table, ""]
        summary["decoding_cost"] = decoding
    lines += [*stage_costs(pipeline), ""]

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
    """What a run should show: experts beat prompting on their own criterion, P-Soups beats the base
    model and preference prompting (interval lower bounds), the sweep steers."""
    bars = []
    for pref, s in summary.get("experts_vs_prompted", {}).items():
        bars.append((f"expert {pref} beats the base model prompted with {pref}, on {pref}",
                     s["win_rate"] is not None and s["win_rate"] > EXPERT_BAR,
                     f"win rate {_ci(s)}% > {100 * EXPERT_BAR:.0f}%"))
    ours = summary.get("overall_vs_base", {}).get(PSOUPS)
    if ours:
        bars.append(("P-Soups beats the base model (average win rate, 95% lower bound > 50%)",
                     ours.get("ci_low") is not None and ours["ci_low"] > 0.5, f"{_ci(ours)}%"))
    prompting = summary.get("psoups_head_to_head", {}).get(PROMPTED)
    if prompting:
        bars.append(("P-Soups beats preference prompting head to head (95% lower bound > 50%)",
                     prompting.get("ci_low") is not None and prompting["ci_low"] > 0.5, f"{_ci(prompting)}%"))
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
