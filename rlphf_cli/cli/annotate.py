"""`rlphf annotate`: Label pairs of rollouts per preference with a judge (TRL preference format)."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def annotate_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Label pairs of rollouts per preference with a judge (TRL preference format).

    Example: [bold]rlphf annotate --prefs all --judge rubric[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf annotate' is not available yet (issue #4)")


def register(app: typer.Typer) -> None:
    app.command("annotate")(annotate_command)
