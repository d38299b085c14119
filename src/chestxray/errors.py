"""User-facing errors: one line that names the file and the reason, never a traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ChestXrayError", "InputError", "first_line"]


class ChestXrayError(Exception):
    """An error whose message is shown to the user as is (the CLI prints it on one line)."""


class InputError(ChestXrayError):
    """A bad input file: ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's (often very long) text, or its type's name."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
