"""`rlphf judge-check`: Does the judge agree with people? Agreement, position bias, ties and cost per preference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlphf_cli.cli.annotate import JudgeOption
from rlphf_cli.cli.common import (
    RecipeOption,
    RunDirOption,
    SetOption,
    cli_errors,
    console,
    one_progress_bar,
    resolve_recipe,
)
from rlphf_cli.cli.spending import DryRunOption, MaxCostOption, plan_line


@cli_errors
def judge_check_command(
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Labelled pairs, JSONL: prompt, chosen (the "
                                                   "person's pick), rejected, preference (id or alias), optional id "
                                                   "and reason (default: the shipped set, 20 pairs per built-in "
                                                   "preference).", show_default=False)] = None,
    judge: JudgeOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the result as JSON.",
                                                show_default=False)] = None,
    max_cost: MaxCostOption = None,
    dry_run: DryRunOption = False,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Does the judge agree with people? Agreement, position bias, ties and cost per preference.

    Every labelled pair is judged in both orders. Agreement: a verdict for the person's pick scores 1,
    a tie 1/2 (95% bootstrap interval over pairs); flips: pairs whose verdict changes with the order.

    Example: [bold]rlphf judge-check --judge rubric[/]

    Example: [bold]rlphf judge-check --labels mine.jsonl --judge openai --max-cost 2[/]
    """
    from rlphf_cli.jobs import judge_check_job
    from rlphf_cli.judges.check import check_judge, plan_check
    from rlphf_cli.runs import atomic_write_json

    resolved = resolve_recipe(recipe, set_, run_dir, judge__backend=judge, judge__max_cost=max_cost)
    job = judge_check_job(resolved, labels)
    if dry_run:
        console.print(plan_line("judge-check", plan_check(job)), highlight=False, soft_wrap=True)
        return
    with one_progress_bar(f"checking the {job.judge.backend} judge") as update:
        result = check_judge(job, progress=update)
    if out is not None:
        atomic_write_json(out, result)
    _print_result(result, out)


def _print_result(result: dict, out: Path | None) -> None:
    from rich.table import Table

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    judge = result["judge"]
    table = Table(title=f"the {judge['backend']} judge" + (f" ({judge['model']})" if judge.get("model") else "")
                  + " against the labels", title_justify="left")
    for column in ("preference", "pairs", "agreement", "95% CI", "flips", "ties", "invalid", "cost"):
        table.add_column(column, justify="left" if column in ("preference", "95% CI") else "right")
    for name, s in [*result["per_preference"].items(), ("overall", result["overall"])]:
        interval = "-" if s["ci_low"] is None else f"{100 * s['ci_low']:.0f}-{100 * s['ci_high']:.0f}%"
        cost, tokens = s["cost"], s["cost"]["prompt_tokens"] + s["cost"]["completion_tokens"]
        spent = f"${cost['usd']:.4f}" if cost["usd"] is not None else f"{tokens:,} tokens" if tokens else "-"
        table.add_row(name, str(s["pairs"]), pct(s["agreement"]), interval, pct(s["flip_rate"]), pct(s["tie_rate"]),
                      str(s["invalid"]), spent)
    console.print(table)
    stats = result["stats"]
    console.print(f"labels: {result['labels']}; {stats['requests']} requests, {stats['cached']} cached, "
                  f"{result['wall_s']:.1f} s"
                  + (f"; wrote {out}" if out else ""), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("judge-check")(judge_check_command)
