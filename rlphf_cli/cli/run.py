"""`rlphf run`: the whole Personalized Soups pipeline from one recipe."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import RunDirOption, SetOption, cli_errors, console, progress_bar, resolve_recipe


class PipelineDisplay:
    """One Rich display for the whole run: stage k of n, the stage's units, inner progress, ETA."""

    def __init__(self, progress):
        self.progress = progress
        self.stage_task = progress.add_task("stages", total=1)
        self.unit_task = progress.add_task("", total=1, visible=False)
        self.inner_task = progress.add_task("", total=1, visible=False)

    def __call__(self, kind: str, *args, **kwargs) -> None:
        p = self.progress
        if kind == "stage":
            index, total, name, n_units = args
            p.update(self.stage_task, completed=index, total=total, description=f"stage {index + 1}/{total}: {name}")
            p.update(self.unit_task, completed=0, total=max(n_units, 1), visible=False, description="")
        elif kind == "unit-start":
            p.update(self.unit_task, visible=True, description=f"  {args[0]}")
            p.update(self.inner_task, visible=False, completed=0)
        elif kind == "unit":
            done, total, label = args
            p.update(self.unit_task, completed=done, total=total, visible=True, description=f"  {label}")
        elif kind == "stage-end":
            # A line per stage stays on screen (and in a CI log, where the live display is not drawn).
            name, counts, seconds = args
            done = f"{counts['ran']} ran, {counts['skipped']} skipped" if counts["ran"] else "up to date"
            p.console.print(f"[green]✓[/] {name}: {done} ({seconds:.1f} s)", highlight=False)
        elif kind == "inner":
            completed, total = kwargs.get("completed"), kwargs.get("total")
            if completed is None and len(args) >= 2 and all(isinstance(a, (int, float)) for a in args[:2]):
                completed, total = args[:2]
            if completed is not None:
                p.update(self.inner_task, completed=completed, total=total or 1, visible=True,
                         description=f"    {kwargs.get('description', '')}")


@cli_errors
def run_command(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe YAML or built-in name (default: tiny).")] = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run this stage alone.")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Rerun from this stage on.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute finished stages.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved recipe and plan.")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="A smoke run of this recipe in seconds, into <run_dir>-smoke: "
                                        "its preferences, templates and settings on tiny-random with the smoke "
                                        "recipe's sizes, judged by 'coin'. Its numbers mean nothing.")] = False,
) -> None:
    """Run every stage in order (resumable): rollouts, annotate, reward models, policies, soups, judge, report.

    Example: [bold]rlphf run recipes/tiny.yaml --dry-run[/]   ·   CI: [bold]rlphf run smoke[/], [bold]rlphf run my.yaml --smoke[/]
    """
    from rlphf_cli.pipeline import plan, run_pipeline
    from rlphf_cli.recipe import check_trainer_fields

    resolved = resolve_recipe(recipe, set_, run_dir, smoke=smoke)
    if smoke:
        from rlphf_cli.smoke import describe

        console.print(f"[bold yellow]smoke run[/] of {resolved.source} into [bold]{resolved.resolved_run_dir()}[/]: "
                      f"{describe(resolved)}; its numbers mean nothing", highlight=False, soft_wrap=True)
    check_trainer_fields(resolved)
    if dry_run:
        console.print(f"# resolved recipe ({resolved.source})", style="dim")
        console.print(resolved.to_yaml(), highlight=False, markup=False)
        console.print(f"# plan: {len(plan(resolved))} stages into {resolved.resolved_run_dir()}", style="dim")
        for i, stage in enumerate(plan(resolved), 1):
            console.print(f"{i:>2}. [bold]{stage.name}[/]: {stage.description}", highlight=False)
        return

    from rich.table import Table

    from rlphf_cli.training import quiet_libraries

    quiet_libraries()
    with progress_bar() as progress:
        summary = run_pipeline(resolved, only=only, from_stage=from_, force=force, progress=PipelineDisplay(progress))

    table = Table(title=f"rlphf run: {summary['run_dir']}")
    for column in ("stage", "units", "ran", "skipped"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, counts in summary["stages"].items():
        table.add_row(stage, str(counts["units"]), str(counts["ran"]), str(counts["skipped"]))
    console.print(table)
    _print_results(summary["report_summary"])
    console.print(f"report: [bold]{summary['report']}[/]")


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
    for system, s in results.get("overall_vs_base", {}).items():
        table.add_row(system, f"{100 * s['win_rate']:.1f}%", f"{100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}%"
                      if s.get("ci_low") is not None else "-", str(s["n"]))
    for pref, rate in results.get("experts_vs_base", {}).items():
        table.add_row(f"expert {pref} (own criterion)", "-" if rate is None else f"{100 * rate:.1f}%", "", "")
    if table.row_count:
        console.print(table)
    for check in results.get("checks", []):
        mark = "[green]pass[/]" if check["pass"] else "[red]FAIL[/]"
        console.print(f"{mark} {check['check']}: {check['detail']}", highlight=False, soft_wrap=True)
    for warning in results.get("warnings", []):
        console.print(f"[bold red]WARNING: {warning}[/]", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
