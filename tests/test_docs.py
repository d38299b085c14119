"""The documentation's command lines are real: every ``chestxray ...`` line in a fenced code block of
README.md and docs/*.md parses against the CLI that ships (the same click command tree ``chestxray``
runs, with each command's work replaced by nothing), and the README stays short."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from chestxray.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced code block, backslash continuations joined."""
    found, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found.append((start, pending + line))
        pending = ""
    return found


# `chestxray ...` (after a `$` prompt or a `.venv/bin/` prefix), or `... -m chestxray.cli ...` (python, torchrun)
COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:\S*/)?chestxray(?=\s)|\s-m\s+chestxray\.cli(?=\s)")


def command_lines(text: str) -> list[tuple[int, str]]:
    """The fenced lines that run the chestxray CLI, each as ``chestxray ARGS...``."""
    lines = []
    for number, line in fenced_lines(text):
        found = COMMAND.search(line)
        if found:
            lines.append((number, "chestxray" + line[found.end():]))
    return lines


def arguments(line: str) -> list[str]:
    """The arguments a reader would type for ``line``: comments dropped; an optional part ``[--flag X]``
    typed (it must parse too); of alternatives ``a|b`` in brackets the first; ``...`` (more of the
    same) dropped; a redirection or pipe ends the command."""
    line = re.sub(r"\[([^\]]*)\]", lambda m: " " + m.group(1).split("|")[0] + " ", line)
    words = shlex.split(line, comments=True)[1:]
    typed = []
    for word in words:
        if word in ("|", ">", ">>", "&&", ";", "2>&1"):
            break
        if word != "...":
            typed.append(word)
    return typed


@pytest.fixture(scope="module")
def parser():
    """The ``chestxray`` command tree (typer's click group) with every command's body replaced by nothing."""
    group = typer.main.get_command(app)
    for command in group.commands.values():
        command.callback = lambda **_: None
    return group


def all_command_lines() -> list[tuple[str, int, str]]:
    return [(path.relative_to(ROOT).as_posix(), number, line)
            for path in DOCUMENTS for number, line in command_lines(path.read_text(encoding="utf-8"))]


def test_the_extraction_reads_fences_continuations_and_placeholders() -> None:
    text = "```bash\n$ chestxray serve B   # a comment\nchestxray listen B \\\n  --port 1 [--cam]\n```\n" \
           "chestxray outside a fence\n~~~\n.venv/bin/chestxray predict B x.png | head\n" \
           "torchrun --nproc-per-node 2 -m chestxray.cli train D --name r\npython -c 'import chestxray'\n~~~\n"
    lines = [line for _, line in command_lines(text)]
    assert [arguments(line) for line in lines] == [["serve", "B"], ["listen", "B", "--port", "1", "--cam"],
                                                   ["predict", "B", "x.png"], ["train", "D", "--name", "r"]]
    assert arguments("chestxray adapt B D --out N [--mode recalibrate|finetune] ...") == \
        ["adapt", "B", "D", "--out", "N", "--mode", "recalibrate"]


def test_a_wrong_command_line_fails_to_parse(parser) -> None:
    """The check can fail: an option that does not exist, or a missing argument, is refused."""
    for wrong in (["train", "DATA", "--epoch", "3"], ["evaluate", "BUNDLE"], ["predikt", "B", "x.png"]):
        with pytest.raises(typer.TyperException, match="No such|Missing"):
            parser.main(wrong, prog_name="chestxray", standalone_mode=False)


def test_every_documented_command_line_parses(parser) -> None:
    lines = all_command_lines()
    assert len(lines) >= 30, f"only {len(lines)} chestxray command lines found in fenced blocks"
    commands = {arguments(line)[0] for _, _, line in lines if arguments(line)}
    assert {"audit", "train", "evaluate", "predict", "serve", "adapt", "listen", "export", "cv", "sweep"} <= commands
    failures = []
    for where, number, line in lines:
        try:
            parser.main(arguments(line), prog_name="chestxray", standalone_mode=False)
        except typer.TyperException as err:  # typer's click: every usage error of the parse
            failures.append(f"{where}:{number}: {line.strip()}\n    {err.format_message()}")
    assert not failures, "documented command lines that the CLI refuses:\n" + "\n".join(failures)


def test_the_readme_is_read_in_five_minutes() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
