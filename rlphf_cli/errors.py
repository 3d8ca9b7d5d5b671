"""Exceptions of the library. Only `rlphf_cli.cli` turns them into a message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close option exists, else a list of the valid ones."""
    options = sorted(set(options))
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (choose from: {', '.join(options)})" if options else ""


class RlphfError(Exception):
    """Bad input or a missing artifact: the user can fix it. Shown as one line, exit code 2."""

    exit_code = 2


class RecipeError(RlphfError):
    """A recipe that does not validate; the message names the file and the field path."""


class InputError(RlphfError):
    """A bad input file, option value or combination of options."""


class FileSystemError(RlphfError):
    """A path that cannot be read or written: a file where a folder should be, no permission, a full
    disk, a file size limit. The message names the path."""


class Interrupted(RlphfError):
    """Ctrl-C: the message says what was kept; `resume` says whether --resume continues it."""

    exit_code = 130

    def __init__(self, message: str, resume: bool = False):
        super().__init__(message)
        self.resume = resume

    def __reduce__(self):
        return type(self), (str(self), self.resume)


class MissingArtifactError(RlphfError):
    """An artifact of an earlier stage is missing; the message names the command that makes it."""

    def __init__(self, what: str, path, command: str):
        super().__init__(f"{what} not found at {path}; make it with: {command}")
        self.what, self.path, self.command = what, path, command

    def __reduce__(self):  # pipeline worker processes send it back pickled
        return type(self), (self.what, self.path, self.command)


class MissingInputsError(RlphfError):
    """Inputs of a stage command are missing: all of them listed once, with the command that makes them."""

    def __init__(self, missing: list[tuple[str, str]], command: str):
        listed = "; ".join(f"{what} ({path})" for what, path in missing)
        super().__init__(f"{len(missing)} input{'s' if len(missing) != 1 else ''} missing: {listed}. "
                         f"Make {'them all' if len(missing) != 1 else 'it'} and go on with: {command}")
        self.missing, self.command = missing, command

    def __reduce__(self):
        return type(self), (self.missing, self.command)


class NotAvailableYet(RlphfError):
    """A command whose implementation has not landed yet."""


class SpendingLimitReached(RlphfError):
    """A judge stopped sending requests at the spending limit; what was answered is cached."""
