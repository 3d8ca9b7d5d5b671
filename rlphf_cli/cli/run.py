"""`rlphf run`: the whole Personalized Soups pipeline from one recipe."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import (
    PipelineDisplay,
    RecipeOption,
    RunDirOption,
    SetOption,
    cli_errors,
    console,
    either,
    print_warnings,
    progress_bar,
    resolve_recipe,
)
from rlphf_cli.cli.spending import MaxCostOption, plan_line

# rlphf_cli.pipeline.STAGE_NAMES, written out so that `--help` imports no library (a test keeps them equal).
STAGES = ("tiny-model, rollouts, annotate, train-rm, train-policy, baselines, merge, evaluate, pareto, judge, "
          "report")


@cli_errors
def run_command(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe YAML or built-in name (default: $RLPHF_RECIPE, "
                                                   "./rlphf.yaml, tiny).", show_default=False)] = None,
    recipe_option: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
    only: Annotated[Optional[str], typer.Option("--only", help=f"Run this stage alone: {STAGES}.",
                                                show_default=False)] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help=f"Rerun from this stage on: {STAGES}.",
                                                 show_default=False)] = None,
    prefs: Annotated[Optional[str], typer.Option("--prefs", "--pref", help="With --only annotate, train-rm or "
                                                 "train-policy: only these preferences' units, e.g. P2A (one "
                                                 "job-array task; default: all). --pref is the same option.",
                                                 show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute finished stages.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved recipe and plan, with "
                                          "the requests each judging stage would send and their cost.")] = False,
    max_cost: MaxCostOption = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="A smoke run of this recipe in seconds, into <run_dir>-smoke: "
                                        "its preferences, templates and settings on tiny-random with the smoke "
                                        "recipe's sizes, judged by 'coin'. Its numbers mean nothing.")] = False,
) -> None:
    """Run every stage in order (resumable): rollouts, annotate, reward models, policies, soups, judge, report.

    Under torchrun or accelerate launch (several processes) it runs one training stage:
    [bold]--only train-rm|train-policy|baselines[/], with [bold]--prefs[/] for one job-array task.

    Example: [bold]rlphf run recipes/tiny.yaml --dry-run[/]

    CI: [bold]rlphf run smoke[/], [bold]rlphf run my.yaml --smoke[/]
    """
    from rlphf_cli.pipeline import Pipeline, run_pipeline
    from rlphf_cli.recipe import recipe_warnings
    from rlphf_cli.training import is_main_process, quiet_libraries

    resolved = resolve_recipe(either(recipe, recipe_option, "RECIPE and --recipe"), set_, run_dir, smoke=smoke,
                              judge__max_cost=max_cost)
    pref = prefs
    if smoke:
        from rlphf_cli.smoke import describe

        console.print(f"[bold yellow]smoke run[/] of {resolved.source} into [bold]{resolved.resolved_run_dir()}[/]: "
                      f"{describe(resolved)}; its numbers mean nothing", highlight=False, soft_wrap=True)
    print_warnings(recipe_warnings(resolved))
    if dry_run:
        _print_plan(Pipeline(resolved), only, from_, pref)  # every unit's job built: every setting checked
        return
    quiet_libraries()
    if not is_main_process():  # the other processes of a distributed launch train alongside, silently
        run_pipeline(resolved, only=only, from_stage=from_, force=force, prefs=pref)
        return
    with progress_bar() as progress:
        summary = run_pipeline(resolved, only=only, from_stage=from_, force=force, prefs=pref,
                               progress=PipelineDisplay(progress))
    _print_summary(summary)


def _print_plan(pipeline, only: str | None, from_: str | None, pref: str | None) -> None:
    from rlphf_cli.pipeline import check_selection, plan

    resolved = pipeline.recipe
    picked = check_selection(resolved, only, from_, pref)
    console.print(f"# resolved recipe ({resolved.source})", style="dim")
    console.print(resolved.to_yaml(), highlight=False, markup=False)
    console.print(f"# plan: {len(plan(resolved))} stages into {resolved.resolved_run_dir()}", style="dim")
    for i, stage in enumerate(plan(resolved), 1):
        console.print(f"{i:>2}. [bold]{stage.name}[/]: {stage.description}", highlight=False)
    if only or from_:
        chosen = f"--only {only}" if only else f"--from {from_}"
        console.print(f"# this command runs {chosen}" + (f" for {', '.join(picked)}" if picked else ""),
                      style="dim", highlight=False)
    _print_estimate(resolved)
    for stage, requests in pipeline.judge_plans().items():
        line = plan_line(stage, requests) if hasattr(requests, "requests") else f"{stage}: {requests or 'no paid judge requests'}"
        console.print("# " + line, style="dim", highlight=False, soft_wrap=True)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"rlphf run: {summary['run_dir']}")
    for column in ("stage", "units", "ran", "skipped"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, counts in summary["stages"].items():
        table.add_row(stage, str(counts["units"]), str(counts["ran"]), str(counts["skipped"]))
    console.print(table)
    _print_results(summary["report_summary"])
    console.print(f"report: [bold]{summary['report']}[/]")


def _print_estimate(recipe) -> None:
    from rlphf_cli.estimate import estimate_gpu_hours

    estimate = estimate_gpu_hours(recipe)
    if estimate is None:
        return
    stages = ", ".join(f"{name} {hours:,.1f}" for name, hours in estimate["stages"].items())
    console.print(f"# estimated GPU-hours at full scale ({estimate['params'] / 1e9:.1f}B parameters, "
                  f"{estimate['basis']}): {stages}; total {estimate['total']:,.0f} on {estimate['gpu']} "
                  f"({estimate['total_h100']:,.0f} on an H100). An order of magnitude: see "
                  "rlphf_cli/estimate.py for what it counts.", style="dim", highlight=False, soft_wrap=True)


def _print_results(path) -> None:
    """The headline numbers of report/summary.json: win rates against the base model and the checks."""
    import json
    from pathlib import Path

    from rich.table import Table

    if not Path(path).exists():
        return
    results = json.loads(Path(path).read_text())
    table = Table(title="win rate against the base model (ties half)")
    for column in ("system", "win rate", "95% CI", "judgments"):
        table.add_column(column, justify="left" if column == "system" else "right")
    from rlphf_cli.systems import label

    for system, s in results.get("overall_vs_base", {}).items():
        table.add_row(label(system), f"{100 * s['win_rate']:.1f}%", f"{100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}%"
                      if s.get("ci_low") is not None else "-", str(s["n"]))
    for pref, s in results.get("experts_vs_prompted", {}).items():
        table.add_row(f"expert {pref} vs prompted base ({pref})", f"{100 * s['win_rate']:.1f}%",
                      f"{100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}%" if s.get("ci_low") is not None else "-",
                      str(s["n"]))
    if table.row_count:
        console.print(table)
    for check in results.get("checks", []):
        mark = "[green]pass[/]" if check["pass"] else "[red]FAIL[/]"
        console.print(f"{mark} {check['check']}: {check['detail']}", highlight=False, soft_wrap=True)
    for warning in results.get("warnings", []):
        console.print(f"[bold red]WARNING: {warning}[/]", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
