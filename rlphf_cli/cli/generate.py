"""`rlphf generate`: Generate responses with the base model, one adapter or a soup."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def generate_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Generate responses with the base model, one adapter or a soup.

    Example: [bold]rlphf generate --soup concise=0.5,friendly=0.5 --prefs P2A,P3A[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf generate' is not available yet (issue #3)")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
