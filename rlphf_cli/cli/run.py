"""`rlphf run`: the whole Personalized Soups pipeline from one recipe."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import RunDirOption, SetOption, cli_errors, console, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def run_command(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe YAML or built-in name (default: tiny).")] = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run this stage alone.")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Rerun from this stage on.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute finished stages.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved recipe and plan.")] = False,
) -> None:
    """Run every stage in order (resumable): rollouts, annotate, reward models, policies, soups, judge, report.

    Example: [bold]rlphf run recipes/tiny.yaml --dry-run[/]
    """
    from rlphf_cli.pipeline import plan
    from rlphf_cli.recipe import check_trainer_fields

    resolved = resolve_recipe(recipe, set_, run_dir)
    if dry_run:
        check_trainer_fields(resolved)
        console.print(f"# resolved recipe ({resolved.source})", style="dim")
        console.print(resolved.to_yaml(), highlight=False, markup=False)
        console.print(f"# plan: {len(plan(resolved))} stages into {resolved.resolved_run_dir()}", style="dim")
        for i, stage in enumerate(plan(resolved), 1):
            console.print(f"{i:>2}. [bold]{stage.name}[/]: {stage.description}", highlight=False)
        return
    raise NotAvailableYet("'rlphf run' without --dry-run is not available yet (issue #7)")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
