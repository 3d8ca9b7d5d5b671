"""`rlphf tiny-model`: Build the embedded tiny instruction model (CPU, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rlphf_cli.cli.common import (
    RecipeOption,
    RunDirOption,
    SetOption,
    cli_errors,
    console,
    one_progress_bar,
    resolve_recipe,
)
from rlphf_cli.errors import InputError


@cli_errors
def tiny_model_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Build into this folder instead of the cache "
                                                "($RLPHF_HOME, default ~/.cache/rlphf).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a built model is there.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the build (the cached model for `model: tiny` uses 0).")] = 0,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Build the embedded tiny instruction model (CPU, offline).

    A byte-level BPE tokenizer and a ~1M-parameter Llama, SFT'd with TRL on the shipped corpus
    (145 topics; responses vary in register, length and tone). `model: tiny` in a recipe builds it
    on first use; this command builds it ahead of time and prints where it is.

    Example: [bold]rlphf tiny-model --out ./tiny[/]
    """
    from rlphf_cli.models import tiny

    resolve_recipe(recipe, set_, run_dir)
    target = out if out is not None else tiny.tiny_model_dir(seed)
    if out is not None and out.exists() and any(out.iterdir()) and not tiny.is_built(out) and not force:
        raise InputError(f"{out}: folder exists and is not a tiny model; choose another --out or pass --force")
    cached = tiny.is_built(target) and not force and (
        out is None or tiny.read_build_info(target).get("fingerprint") == tiny.build_fingerprint(seed))
    if not cached:
        with one_progress_bar("SFT") as progress:
            if out is not None:
                tiny.build_tiny_model(out, seed=seed, progress=progress)
            else:
                tiny.ensure_tiny_model(force=force, seed=seed, progress=progress)
    info = tiny.read_build_info(target)
    console.print(f"tiny model{' (cached)' if cached else ''}: {target}", soft_wrap=True, highlight=False)
    table = Table(show_header=False)
    table.add_row("parameters", f"{info['params'] / 1e6:.2f}M")
    table.add_row("size", f"{info['size_mb']:.1f} MB")
    table.add_row("final loss", f"{info['final_loss']:.4f}")
    table.add_row("steps / examples", f"{info['steps']} / {info['examples']}")
    table.add_row("build time", f"{info['build_seconds']:.0f} s")
    table.add_row("weights sha256", info["weights_sha256"][:16])
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("tiny-model")(tiny_model_command)
