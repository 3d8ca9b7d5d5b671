"""`rlphf train-policy`: Train one LoRA policy per preference with RL against its reward model."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def train_policy_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Train one LoRA policy per preference with RL against its reward model.

    Example: [bold]rlphf train-policy --pref concise --algo rloo[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf train-policy' is not available yet (issue #5)")


def register(app: typer.Typer) -> None:
    app.command("train-policy")(train_policy_command)
