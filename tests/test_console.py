"""Output that survives a pipe: no hard wrap off a terminal, whatever COLUMNS says."""

from __future__ import annotations

import io

from rich.table import Table

from chestxray.console import make_console


def _piped(monkeypatch, columns: str = "60"):
    monkeypatch.setenv("COLUMNS", columns)
    console = make_console()
    console.file = io.StringIO()  # not a terminal
    return console


def test_a_long_line_is_one_line_in_a_pipe(monkeypatch) -> None:
    console = _piped(monkeypatch)
    line = "trained on " + "/tmp/" + "x" * 150 + " (4 classes, 256px; 2 threads, best trial 0)"
    console.print(line, highlight=False)
    assert console.file.getvalue() == line + "\n"


def test_a_table_is_as_wide_as_its_content_in_a_pipe(monkeypatch) -> None:
    console = _piped(monkeypatch, "20")
    table = Table("file", "label")
    table.add_row("a" * 70 + ".png", "bacterial_pneumonia")
    console.print(table)
    rows = console.file.getvalue().splitlines()
    assert any("a" * 70 + ".png" in row and "bacterial_pneumonia" in row for row in rows), rows


def test_a_terminal_still_wraps_at_words(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    console = make_console()
    console.file = io.StringIO()
    console._force_terminal = True  # what rich sees on a tty
    console.print("word " * 20, highlight=False)
    lines = console.file.getvalue().splitlines()
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    assert all(part == "word" for line in lines for part in line.split())
