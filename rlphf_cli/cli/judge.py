"""`rlphf judge`: Pairwise win rates of one generation file against another, per criterion."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def judge_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Pairwise win rates of one generation file against another, per criterion.

    Example: [bold]rlphf judge --a gen/psoups.jsonl --b gen/base.jsonl --criteria all[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf judge' is not available yet (issue #4)")


def register(app: typer.Typer) -> None:
    app.command("judge")(judge_command)
