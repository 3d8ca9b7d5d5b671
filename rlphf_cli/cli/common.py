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

from rlphf_cli.errors import Interrupted, RlphfError

console = Console()
err_console = Console(stderr=True)

RecipeOption = Annotated[
    Optional[str],
    typer.Option("--recipe", help="Recipe YAML or built-in name (default: $RLPHF_RECIPE, ./rlphf.yaml, tiny).",
                 show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe value, e.g. --set train_policy.lora.r=8 (repeatable).",
                 show_default=False),
]


def either(new: Any, old: Any, names: str) -> Any:
    """The value given one of two ways (an option and its old spelling, an argument and an option)."""
    if new is not None and old is not None and new != old:
        from rlphf_cli.errors import InputError

        raise InputError(f"{names}: give one, not both")
    return new if new is not None else old


_debug_flag = False  # --debug of the current invocation


def set_debug(enabled: bool) -> None:
    global _debug_flag
    _debug_flag = enabled


def debug_enabled() -> bool:
    return _debug_flag or os.environ.get("RLPHF_DEBUG", "") not in ("", "0")


RunDirOption = Annotated[
    Optional[Path], typer.Option("--run-dir", help="Run directory (default: the recipe's run_dir); its recipe.yaml "
                                 "is the recipe when --recipe is not given.", show_default=False)
]
# Set (to anything but 0) it cuts every command's recipe to smoke sizes, as `rlphf run --smoke` does:
# the quick start's lines in seconds (CI, the first-hour test).
SMOKE_ENV = "RLPHF_SMOKE"


def resolve_recipe(recipe: str | None, sets: list[str] | None, run_dir: Path | None = None, smoke: bool = False,
                   announce: bool = True, **flags: Any):
    """Built-in defaults < recipe < (--smoke) < --set < explicit flags. `flags` use dotted recipe
    paths with '__' for '.', e.g. generate__temperature=0.0; None means the flag was not given.
    Without --recipe, a --run-dir that holds a recipe.yaml runs on that recipe (the one it was made
    with). `announce`: print the recipe and the run directory as the command's first line."""
    from rlphf_cli.recipe import load_recipe

    if recipe is None and run_dir is not None and (Path(run_dir) / "recipe.yaml").is_file():
        recipe = str(Path(run_dir) / "recipe.yaml")
    overrides = {key.replace("__", "."): value for key, value in flags.items()}
    if run_dir is not None:
        overrides["run_dir"] = str(run_dir)
    overlay = None
    if smoke or os.environ.get(SMOKE_ENV, "") not in ("", "0"):
        from rlphf_cli.smoke import apply_smoke as overlay
    resolved = load_recipe(recipe, sets, overrides, origins={"run_dir": "--run-dir"}, overlay=overlay)
    if any(value is not None for key, value in overrides.items() if key != "run_dir"):
        # The run directory keeps its recipe: the one a later command without these flags runs on.
        from rlphf_cli.errors import RlphfError

        with contextlib.suppress(RlphfError):
            plain = load_recipe(recipe, sets, {"run_dir": overrides.get("run_dir")}, overlay=overlay)
            resolved._run_yaml = plain.to_yaml()
    if announce:
        announce_recipe(resolved)
    return resolved


def recipe_line(resolved) -> str:
    """'recipe tiny (built-in), run dir runs/tiny': which recipe a command works with, and where."""
    from rlphf_cli.recipe import builtin_recipes_dir

    source = Path(resolved.source)
    where = "built-in" if source.parent == builtin_recipes_dir() else str(source)
    return f"recipe {resolved.name} ({where}), run dir {resolved.resolved_run_dir()}"


def announce_recipe(resolved) -> None:
    from rlphf_cli.training import is_main_process

    if is_main_process():  # once per launch, not once per process
        err_console.print(recipe_line(resolved), highlight=False, markup=False, soft_wrap=True)


def invocation() -> dict | None:
    """The running command and the options it was given, for the run directory's events.jsonl."""
    if _running is None:
        return None
    name, params = _running
    options = {key: [str(v) for v in value] if isinstance(value, (list, tuple)) else
               str(value) if isinstance(value, Path) else value
               for key, value in params.items() if value not in (None, False, (), [])}
    record = {"command": f"rlphf {name}", "options": options}
    if ARGV is not None:
        record["argv"] = ARGV
    return record


# The command line of this process when it came through `rlphf` (not a test's CliRunner).
ARGV: list[str] | None = None
# (command name, its parameters) while a command runs.
_running: tuple[str, dict] | None = None


def print_note(line: str | None) -> None:
    if line:
        err_console.print(f"[cyan]note:[/] {line}", highlight=False, markup=True, soft_wrap=True)


def print_warnings(lines: list[str]) -> None:
    for line in lines:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, markup=True, soft_wrap=True)


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
    from rich.text import Text

    class QuietProgress(Progress):
        _ticker = None

        def start(self) -> None:
            self._lines = not self.console.is_terminal and not self.disable
            if self._lines:
                # Not a terminal (a pipe, a CI log): Rich draws no bar, only its last state, without
                # an end of line. Lines instead: one per interval while work goes on, and with a
                # lasting display (transient=False) each task's last state.
                import threading

                self._final_lines, self.live.transient = not self.live.transient, True
                self._stopped = threading.Event()
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
            super().start()

        def _line(self, task) -> str:
            from rlphf_cli import progress

            what, show = task.description.strip(), task.fields.get("show")
            if show == ELAPSED_ONLY:
                return f"{what}, {progress.duration(task.elapsed or 0.0)} elapsed"
            if show == NAME_ONLY:
                return what
            return progress.line(what, task.completed, task.total, task.elapsed or 0.0,
                                 None if task.finished else task.time_remaining)

        def _tick(self) -> None:
            from rlphf_cli import progress

            while not self._stopped.wait(progress.interval() or 0.05):
                shown = [self._line(task) for task in self.tasks
                         if task.visible and task.started and not task.finished and task.description.strip()]
                if shown:
                    self.console.print(" | ".join(shown), highlight=False, markup=False, soft_wrap=True)

        def stop(self) -> None:
            if self._ticker is not None:
                self._stopped.set()
                self._ticker.join()
                self._ticker = None
                if self._final_lines:
                    for task in self.tasks:
                        if task.visible and task.started and task.description.strip():
                            self.console.print(self._line(task), highlight=False, markup=False, soft_wrap=True)
            # Rich ends a display that is not a terminal with an empty line, which then stands
            # before an `error:` line or a summary.
            if not self.disable:
                self.live.stop()

    class Remaining(TimeRemainingColumn):
        def render(self, task):
            return Text("") if task.fields.get("show") else super().render(task)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(c) if isinstance(c, str) else c for c in extra), TimeElapsedColumn()]
    if eta:
        columns.append(Remaining())
    return QuietProgress(*columns, console=console, transient=transient)


@contextlib.contextmanager
def one_progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """One bar fed by a library's progress(done, total) callback."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def record_for_launcher(message: str) -> None:
    """Under torchrun / accelerate launch: their failure summary shows what a process wrote to
    $TORCHELASTIC_ERROR_FILE (else 'To enable traceback see ...'), so a failed rank's one line ends
    the job's output too."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def _print_error(message: str) -> None:
    from rich.markup import escape

    # escaped: a message may hold brackets that are not markup ("pip install 'rlphf[gemma]'")
    for line in message.splitlines() or ["error"]:
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, markup=True, soft_wrap=True)


def resume_command() -> str:
    """The command line of this process with --resume, or a description where it is not known."""
    if ARGV is None:
        return "the same command with --resume"
    import shlex

    return "rlphf " + shlex.join([*ARGV, *([] if "--resume" in ARGV else ["--resume"])])


# How a task of the pipeline's display is shown where a time left would be wrong: a stage's (stages
# differ in length by 1000x, so their pace says nothing) shows its name and elapsed time, a unit's
# its name (which one of the stage's units it is); the unit's own steps / prompts / verdicts carry
# the time left.
ELAPSED_ONLY, NAME_ONLY = "elapsed", "name"


class PipelineDisplay:
    """One Rich display for the whole run: stage k of n, the unit running, its steps with a time left."""

    def __init__(self, progress):
        self.progress = progress
        self.stage_task = progress.add_task("", total=1, visible=False, show=ELAPSED_ONLY)
        self.unit_task = progress.add_task("", total=1, visible=False, show=NAME_ONLY)
        self.inner_task = progress.add_task("", total=1, visible=False)

    def __call__(self, kind: str, *args, **kwargs) -> None:
        p = self.progress
        if kind == "stage":
            index, total, name, _ = args
            p.reset(self.stage_task, completed=index, total=total, visible=True,
                    description=f"stage {index + 1}/{total}: {name}")
            # reset, not update: Rich keeps a task finished once it was, which would hide it from the lines
            p.reset(self.unit_task, visible=False, description="")
            p.reset(self.inner_task, visible=False)
        elif kind == "unit-start":
            label, index, total = args
            p.update(self.unit_task, completed=index - 1, total=total, visible=True,
                     description=f"  {label} ({index}/{total})" if total > 1 else f"  {label}")
            p.reset(self.inner_task, completed=0, total=1, visible=False)
        elif kind == "unit":
            done, total, _ = args
            p.update(self.unit_task, completed=done, total=total)
        elif kind == "changed":
            key, outputs = args
            p.console.print(f"[yellow]![/] {', '.join(outputs)} changed since `rlphf run` made it ({key}): kept, "
                            "and what depends on it is recomputed", highlight=False, soft_wrap=True)
        elif kind == "stage-end":
            # A line per stage stays on screen (and in a CI log, where the live display is not drawn).
            name, counts, seconds = args
            done = f"{counts['ran']} ran, {counts['skipped']} skipped" if counts["ran"] else "up to date"
            p.console.print(f"[green]✓[/] {name}: {done} ({seconds:.1f} s)", highlight=False)
        elif kind == "inner":
            done, total, what = args
            p.update(self.inner_task, completed=done, total=total, visible=True, description=f"    {what}")


# Making what is missing is the default, so that the promised lines (`rlphf train-policy --pref
# concise`, then `rlphf merge --weights 0.5,0.5`) work from nothing, as `make target` does.
WithDepsOption = Annotated[bool, typer.Option(
    "--with-deps/--no-deps", help="Make missing inputs first, as `rlphf run` makes them (same jobs, fingerprints "
    "and markers), then go on; --no-deps lists them all in one line and stops.")]


def with_deps_command() -> str:
    """The command line of this process without --no-deps, or a description where it is not known."""
    if ARGV is None:
        return "the same command without --no-deps"
    import shlex

    return "rlphf " + shlex.join([arg for arg in ARGV if arg != "--no-deps"])


def ensure_inputs(resolved, jobs, with_deps: bool) -> None:
    """A stage command's inputs: all there, made now (the default, with the pipeline's display), or
    (--no-deps) one error listing every missing one with the command that makes them."""
    from rlphf_cli.jobs import missing_inputs
    from rlphf_cli.pipeline import make_inputs

    missing = missing_inputs(jobs)
    if not missing:
        return
    if not with_deps:
        make_inputs(resolved, missing, command=with_deps_command())
        return
    from rlphf_cli.training import quiet_libraries

    quiet_libraries()
    with progress_bar() as bar:
        make_inputs(resolved, missing, command=with_deps_command(), make=True, progress=PipelineDisplay(bar))


def cli_errors(func):
    """Turn library errors into one line on stderr and exit code 2 (a traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        global _running
        from rlphf_cli.runs import reset_invocation, set_invocation

        _running = (func.__name__.removesuffix("_command").replace("_", "-"), kwargs)
        token = set_invocation(invocation())
        try:
            return func(*args, **kwargs)
        except Interrupted as exc:
            for line in str(exc).splitlines():
                err_console.print(f"[yellow]interrupted:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            if getattr(exc, "resume", False):
                err_console.print(f"resume with: {resume_command()}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except RlphfError as exc:
            if debug_enabled():
                raise
            message = str(exc) or type(exc).__name__
            _print_error(message)
            record_for_launcher("error: " + " ".join(message.splitlines()))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except OSError as exc:  # a file-system failure the library did not name itself
            if debug_enabled():
                raise
            from rlphf_cli.runs import describe_os_error

            _print_error(f"{exc.filename}: {describe_os_error(exc)}" if exc.filename else describe_os_error(exc))
            raise typer.Exit(2) from None
        finally:
            _running = None
            reset_invocation(token)

    return wrapper
