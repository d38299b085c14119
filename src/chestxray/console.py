"""The one place a rich console is made.

In a terminal rich wraps at word boundaries to the terminal's width. Anywhere else (a pipe, a file,
a log, a test runner) nothing is hard-wrapped: a line that is cut at 80 columns, or at ``COLUMNS``,
breaks ``grep`` and every parser downstream, so off a terminal the width is unbounded and text is
soft-wrapped (left to whatever displays it).
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

__all__ = ["make_console", "PIPE_WIDTH"]

# Wide enough for any line or table the tool writes; tables are as wide as their content, never this.
PIPE_WIDTH = 100_000


class _Console(Console):
    """A rich console that hard-wraps only on a terminal (checked at every print, as the stream may change)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def print(self, *objects, soft_wrap=None, **kwargs) -> None:  # noqa: A003 - rich's name
        super().print(*objects, soft_wrap=(not self.is_terminal) if soft_wrap is None else soft_wrap, **kwargs)


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr): word-wrapped in a terminal, never hard-wrapped elsewhere."""
    return _Console(stderr=stderr)
