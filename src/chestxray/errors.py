"""User-facing errors: one line that names the file and the reason, never a traceback."""

from __future__ import annotations

from pathlib import Path


class ChestXrayError(Exception):
    """An error whose message is shown to the user as is (the CLI prints it on one line)."""


class InputError(ChestXrayError):
    """A bad input file: ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
