"""`rlphf train-rm`: Train one LoRA reward model per preference with TRL's RewardTrainer."""

from __future__ import annotations

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, resolve_recipe
from rlphf_cli.errors import NotAvailableYet


@cli_errors
def train_rm_command(recipe: RecipeOption = None, run_dir: RunDirOption = None, set_: SetOption = None) -> None:
    """Train one LoRA reward model per preference with TRL's RewardTrainer.

    Example: [bold]rlphf train-rm --pref concise[/]
    """
    resolve_recipe(recipe, set_, run_dir)
    raise NotAvailableYet("'rlphf train-rm' is not available yet (issue #5)")


def register(app: typer.Typer) -> None:
    app.command("train-rm")(train_rm_command)
