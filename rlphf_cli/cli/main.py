"""The `rlphf` command. Heavy libraries are imported inside commands so --help stays fast."""

from __future__ import annotations

import inspect
import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from rlphf_cli import __version__
from rlphf_cli.cli import (
    annotate,
    common,
    generate,
    judge,
    judge_check,
    merge,
    profile,
    run,
    serve,
    tiny_model,
    train_policy,
    train_rm,
)


class _FlagsReadAsFlags:
    """Typer's help prints a type beside every option, flags included (`--force <bool>`), as if
    they took a value: give flags an empty metavar, the help option too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class FlagCommand(_FlagsReadAsFlags, TyperCommand):
    pass


class FlagGroup(_FlagsReadAsFlags, TyperGroup):
    pass


app = typer.Typer(
    name="rlphf",
    cls=FlagGroup,
    help="Personalized Soups: per-preference reward models and LoRA policies, merged post hoc "
    "for any mix of preferences, measured with pairwise judges.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlphf {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    # Set on every invocation, so one `--debug` run does not leak into the next in the same process.
    common.set_debug(debug)


def _reflowed(doc: str) -> str:
    """Rich help keeps a docstring's line breaks, which wrap raggedly in a narrow terminal: join the
    lines of each paragraph so Rich wraps them to the terminal's width."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


for module in (tiny_model, generate, annotate, train_rm, train_policy, merge, judge, judge_check, run, serve, profile):
    module.register(app)
for command in app.registered_commands:
    if command.cls in (None, TyperCommand):
        command.cls = FlagCommand
    if command.help is None and command.callback.__doc__:
        command.help = _reflowed(command.callback.__doc__)


def main() -> None:
    common.ARGV = sys.argv[1:]
    app()


if __name__ == "__main__":
    main()
