"""What every command shares: recipe/run-dir/--set options, recipe resolution, error display.

Commands are thin: parse options, resolve the recipe, call one library function, print.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from rlphf_cli.errors import RlphfError

console = Console()
err_console = Console(stderr=True)

RecipeOption = Annotated[
    Optional[str],
    typer.Option("--recipe", help="Recipe YAML or built-in name (default: $RLPHF_RECIPE, ./rlphf.yaml, tiny).",
                 show_default=False),
]
RunDirOption = Annotated[
    Optional[Path], typer.Option("--run-dir", help="Run directory (default: the recipe's run_dir).", show_default=False)
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe value, e.g. --set train_policy.lora.r=8 (repeatable).",
                 show_default=False),
]


_debug_flag = False  # --debug of the current invocation


def set_debug(enabled: bool) -> None:
    global _debug_flag
    _debug_flag = enabled


def debug_enabled() -> bool:
    return _debug_flag or os.environ.get("RLPHF_DEBUG", "") not in ("", "0")


def resolve_recipe(recipe: str | None, sets: list[str] | None, run_dir: Path | None = None, smoke: bool = False,
                   **flags: Any):
    """Built-in defaults < recipe < (--smoke) < --set < explicit flags. `flags` use dotted recipe
    paths with '__' for '.', e.g. generate__temperature=0.0; None means the flag was not given."""
    from rlphf_cli.recipe import load_recipe

    overrides = {key.replace("__", "."): value for key, value in flags.items()}
    if run_dir is not None:
        overrides["run_dir"] = str(run_dir)
    return load_recipe(recipe, sets, overrides, smoke=smoke)


def progress_bar(*extra: Any, transient: bool = True, eta: bool = True):
    """Every command's progress display: description, bar, done/total, `extra` columns (format
    strings or Rich columns), elapsed and (with `eta`) remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(c) if isinstance(c, str) else c for c in extra), TimeElapsedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient)


@contextlib.contextmanager
def one_progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """One bar fed by a library's progress(done, total) callback."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def cli_errors(func):
    """Turn library errors into one line on stderr and exit code 2 (a traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RlphfError as exc:
            if debug_enabled():
                raise
            for line in str(exc).splitlines() or [type(exc).__name__]:
                err_console.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper
