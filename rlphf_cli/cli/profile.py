"""`rlphf profile learn`: find a user's soup from a few A/B picks in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, console, resolve_recipe

profile_app = typer.Typer(help="A user's soup: learned from picks between two answers.", no_args_is_help=True)


def _sliders(summary: dict) -> str:
    return "  ".join(f"{dim} {value:+.2f} ± {summary['uncertainty'][dim]:.2f}"
                     for dim, value in summary["point"].items())


@cli_errors
def learn_command(
    user: Annotated[str, typer.Option("--user", help="Whose profile (the `user` of chat requests).")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Questions to ask.")] = 10,
    profiles: Annotated[Optional[Path], typer.Option(
        "--profiles", help="The profiles file `rlphf serve --profiles` reads (default: <run-dir>/profiles.yaml); "
        "other users are kept.", show_default=False)] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", help="Ask with your own prompt (repeatable; default: the most telling of every soup's "
        "answers to the run's first 10 evaluation prompts, made once).",
        show_default=False)] = None,
    strategy: Annotated[str, typer.Option("--strategy", help="active (most informative pair) | random.")] = "active",
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Learn a user's soup from picks: two answers side by side, type 1, 2, = (about the same) or 0
    (both bad); the sliders' estimate is shown after each pick and saved at the end.

    Example: [bold]rlphf profile learn --user alice --rounds 10[/], then
    [bold]rlphf serve --profiles runs/tiny/profiles.yaml[/] and chat with model "soup", user "alice".
    """
    import numpy as np
    from rich.columns import Columns
    from rich.panel import Panel

    from rlphf_cli.jobs import run_dir as run_of
    from rlphf_cli.learning import run_learner, save_profile
    from rlphf_cli.profiling import PICK_KEYS, soup_spec

    resolved = resolve_recipe(recipe, set_, run_dir)
    path = profiles or run_of(resolved).root / "profiles.yaml"
    with console.status("loading the run's policies and reward models"):
        learner = run_learner(resolved, path, user, strategy=strategy)
    rng = np.random.default_rng(len(learner.picks))
    console.print(f"{user}: {len(learner.picks)} earlier picks; now  {_sliders(learner.summary())}", highlight=False)
    for n in range(1, rounds + 1):
        with console.status(f"question {n}/{rounds}: the two answers"):
            comp = learner.ask(prompt[int(rng.integers(len(prompt)))] if prompt else None)
        console.rule(f"{n}/{rounds}  {comp.prompt}")
        console.print(Columns([Panel(comp.answers[0], title="1", expand=True),
                               Panel(comp.answers[1], title="2", expand=True)], equal=True, expand=True))
        while (key := console.input("better? [1/2/=, 0: both bad] ").strip()) not in PICK_KEYS:
            console.print("type 1, 2, = or 0")
        summary = learner.record(comp.id, PICK_KEYS[key])
        console.print(f"  {_sliders(summary)}  ->  {soup_spec(summary['members'])}", highlight=False)
    saved = save_profile(path, user, learner.summary(), learner.picks)
    console.print(f"saved {user}'s soup {soup_spec(learner.summary()['members'])} to {saved}", highlight=False)


def register(app: typer.Typer) -> None:
    profile_app.command("learn")(learn_command)
    app.add_typer(profile_app, name="profile")
