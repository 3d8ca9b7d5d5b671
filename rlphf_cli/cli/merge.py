"""`rlphf merge`: Merge per-preference LoRA policies into a soup (adapter files only)."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def merge_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Merge per-preference LoRA policies into a soup (adapter files only).

    Example: [bold]rlphf merge --prefs elementary,concise,friendly --weights 0.4,0.3,0.3[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf merge' is not available yet (issue #6)")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
