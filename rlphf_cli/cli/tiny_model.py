"""`rlphf tiny-model`: Build the embedded tiny instruction model (CPU, offline)."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def tiny_model_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Build the embedded tiny instruction model (CPU, offline).

    Example: [bold]rlphf tiny-model --out ./tiny[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf tiny-model' is not available yet (issue #3)")


def register(app: typer.Typer) -> None:
    app.command("tiny-model")(tiny_model_command)
