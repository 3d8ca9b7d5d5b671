"""`rlphf annotate`: Label pairs of rollouts per preference with a judge (TRL preference format)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import (
    RecipeOption,
    RunDirOption,
    SetOption,
    WithDepsOption,
    cli_errors,
    console,
    ensure_inputs,
    one_progress_bar,
    resolve_recipe,
)
from rlphf_cli.cli.spending import DryRunOption, MaxCostOption, plan_line

JudgeOption = Annotated[
    Optional[str], typer.Option("--judge", help="Judge backend: rubric (offline proxy), openai, hf or coin "
                                "(meaningless, smoke runs only); default: the recipe's.",
                                show_default=False)
]


@cli_errors
def annotate_command(
    rollouts: Annotated[Optional[Path], typer.Option("--rollouts", help="Rollouts JSONL with >= 2 samples per "
                                                     "prompt (default: <run-dir>/rollouts.jsonl).",
                                                     show_default=False)] = None,
    prefs: Annotated[Optional[str], typer.Option("--prefs", help="Preferences to label: ids or aliases, "
                                                 "comma-separated, or 'all' (default: annotate.prefs).",
                                                 show_default=False)] = None,
    judge: JudgeOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <run-dir>/annotations).",
                                                show_default=False)] = None,
    pairs_per_prompt: Annotated[Optional[int], typer.Option("--pairs-per-prompt", min=1,
                                                            help="Pairs drawn per prompt (default: "
                                                            "annotate.pairs_per_prompt).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Label again, replacing the run directory's "
                                        "annotations (verdicts are cached).")] = False,
    max_cost: MaxCostOption = None,
    dry_run: DryRunOption = False,
    with_deps: WithDepsOption = True,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Label pairs of rollouts per preference with a judge (TRL preference format).

    Writes <out>/<id>.jsonl (prompt, chosen, rejected) and <id>.summary.json per preference; ties
    are dropped, unreadable judge answers are counted as invalid, verdicts are cached.

    Example: [bold]rlphf annotate --prefs all --judge rubric[/]
    """
    from rlphf_cli.jobs import annotate_job
    from rlphf_cli.judges.annotate import annotate_rollouts, plan_annotation

    resolved = resolve_recipe(recipe, set_, run_dir, annotate__prefs=prefs, annotate__judge=judge,
                              annotate__pairs_per_prompt=pairs_per_prompt, judge__max_cost=max_cost)
    job = annotate_job(resolved, rollouts=rollouts, out_dir=out)
    if dry_run:
        console.print(plan_line("annotate", plan_annotation(job)), highlight=False, soft_wrap=True)
        return
    if rollouts is None:  # the run's rollouts: made as `rlphf run` does, unless --no-deps
        ensure_inputs(resolved, [job], with_deps)
    with one_progress_bar(f"annotating with the {job.judge.backend} judge") as update:
        summary = annotate_rollouts(job, progress=update, force=force)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"annotations in {summary['out_dir']}", title_justify="left")
    for column in ("preference", "pairs", "written", "ties dropped", "invalid", "failed", "chosen shown first"):
        table.add_column(column, justify="left" if column == "preference" else "right")
    for pref_id, s in summary["preferences"].items():
        first = "-" if s["first_shown_rate"] is None else f"{100 * s['first_shown_rate']:.0f}%"
        table.add_row(pref_id, str(s["pairs"]), str(s["written"]), str(s["ties_dropped"]), str(s["invalid"]),
                      str(s["failed"]), first)
    console.print(table)
    stats = summary["stats"]
    skipped = summary["identical_samples"] + summary["single_sample"]
    spent = summary["spend"]["usd"]
    console.print(
        f"{summary['prompts']} prompts ({skipped} without two distinct samples), judge {summary['judge']['backend']}: "
        f"{stats['requests']} requests, {stats['cached']} cached, {stats['retries']} retries, "
        f"{stats['prompt_tokens']}+{stats['completion_tokens']} tokens"
        + (f", ${spent:.4f} spent" if spent else "") + f", {summary['wall_s']:.1f} s",
        highlight=False,
    )
    if summary["failed"]:
        console.print(f"[yellow]{summary['failed']} pairs got no answer (endpoint errors); rerun to retry them "
                      "(verdicts so far are cached)[/]")


def register(app: typer.Typer) -> None:
    app.command("annotate")(annotate_command)
