"""`rlphf judge`: Pairwise win rates of one generation file against another, per criterion."""

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
def judge_command(
    a: Annotated[Path, typer.Option("--a", help="System A: a generation JSONL file, or a folder of per-combination "
                                    "files.", show_default=False)],
    b: Annotated[Path, typer.Option("--b", help="System B (the baseline), matched to A by (id, combination).",
                                    show_default=False)],
    criteria: Annotated[Optional[str], typer.Option("--criteria", help="'combo' (each record's own preferences, "
                                                    "the default), 'all', or ids/aliases such as P1A,P2A.",
                                                    show_default=False)] = None,
    judge: JudgeOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Result JSON; a Markdown table is written next to it "
                                                "(default: <run-dir>/judgments/<system A>_vs_<system B>.json, a folder named by "
                                                "its name, a file by its records' system).",
                                                show_default=False)] = None,
    single_order: Annotated[bool, typer.Option("--single-order", help="Ask each pair once (A first) instead of in "
                                               "both orders.")] = False,
    common: Annotated[bool, typer.Option("--common", help="Judge the records both sides share (by id and "
                                         "combination) and say how many were left out.")] = False,
    bootstrap_samples: Annotated[Optional[int], typer.Option("--bootstrap-samples", min=0, help="Bootstrap "
                                                             "resamples for the 95% interval.",
                                                             show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Judge again, replacing the run directory's judgment "
                                        "(verdicts are cached).")] = False,
    max_cost: MaxCostOption = None,
    dry_run: DryRunOption = False,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Pairwise win rates of one generation file against another, per criterion.

    A win needs both presentation orders to agree (disagreement is a tie); ties count half. Records
    are matched by (id, combination); answers made without a preference prompt (the base model's
    plain.jsonl) match every combination, so every comparison of the report can be redone here.

    Example: [bold]rlphf judge --a $G/psoups --b $G/base/plain.jsonl[/] (G=runs/tiny/generations)

    Example: [bold]rlphf judge --a mine.jsonl --b theirs.jsonl --criteria all --common[/]
    """
    from rlphf_cli.evaluation.judging import default_out, judge_files, plan_judgment
    from rlphf_cli.jobs import judge_job
    from rlphf_cli.jobs import run_dir as run_of

    resolved = resolve_recipe(recipe, set_, run_dir, judge__backend=judge,
                              judge__both_orders=False if single_order else None,
                              judge__bootstrap_samples=bootstrap_samples, judge__max_cost=max_cost)
    out = out or default_out(run_of(resolved), a, b)
    job = judge_job(resolved, a, b, criteria_=criteria, out=out, common=common)
    if dry_run:
        console.print(plan_line("judge", plan_judgment(job)), highlight=False, soft_wrap=True)
        return
    with one_progress_bar(f"judging with the {job.judge.backend} judge") as update:
        result = judge_files(job, progress=update, force=force)
    _print_result(result, out)


def _print_result(result: dict, out: Path) -> None:
    from rich.table import Table

    from rlphf_cli.evaluation.judging import format_ci, rows

    table = Table(title=f"{result['system_a']} (A) vs {result['system_b']} (B): win rate of A, ties count half",
                  title_justify="left")
    for column in ("scope", "wins", "ties", "losses", "invalid", "win rate", "95% CI", "agree"):
        table.add_column(column, justify="left" if column in ("scope", "95% CI") else "right")
    for scope, s in rows(result):
        rate = "-" if s["win_rate"] is None else f"{100 * s['win_rate']:.1f}%"
        agreement = "-" if s["agreement"] is None else f"{100 * s['agreement']:.0f}%"
        table.add_row(scope, str(s["wins"]), str(s["ties"]), str(s["losses"]), str(s["invalid"]), rate,
                      format_ci(s), agreement)
    console.print(table)
    stats = result["stats"]
    console.print(f"{result['pairs']} matched records, {result['judgments']} judgments, judge "
                  f"{result['judge']['backend']}: {stats['requests']} requests, {stats['cached']} cached, "
                  f"{stats['prompt_tokens']}+{stats['completion_tokens']} tokens"
                  + (f", ${result['spend']['usd']:.4f} spent" if result["spend"]["usd"] else "")
                  + f", {result['wall_s']:.1f} s", highlight=False)
    left = result["left_out"]
    if left["only_a"] or left["only_b"]:
        console.print(f"--common: left out {left['only_a']} records only in A and {left['only_b']} only in B",
                      highlight=False)
    console.print(f"wrote {out} and {result['markdown']}", highlight=False)
    if result["overall"]["failed"]:
        console.print(f"[yellow]{result['overall']['failed']} judgments got no answer (endpoint errors); rerun to "
                      "retry them (verdicts so far are cached)[/]")


def register(app: typer.Typer) -> None:
    app.command("judge")(judge_command)
