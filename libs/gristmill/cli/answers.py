"""Reading a person's answers in the terminal, one line at a time: each answer is parsed by a pure function, and an
answer it refuses gets its one-line reason and the question again.

Answers come from stdin (a file of answers can be piped in); the end of input ends the session (``EndOfInput``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum
from typing import Protocol, TypeVar

import typer

T = TypeVar("T")

# One line of input without its line break; None at the end of input.
ReadLine = Callable[[], str | None]


class Echo(Protocol):
    """Where questions and messages go (``typer.echo``; a list in tests)."""

    def __call__(self, message: str = "", nl: bool = True) -> None: ...


class Decision(Enum):
    """An answer that is no label or response: leave the item to others, or stop labeling."""

    SKIP = "skip"
    QUIT = "quit"


class AnswerError(ValueError):
    """An answer that means nothing here; its message (one line) says what would."""


class EndOfInput(Exception):
    """The input ended before the question was answered: stop, sending nothing more."""


def stdin_line() -> str | None:
    """The next line of stdin without its line break, or None at its end."""
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def echo(message: str = "", nl: bool = True) -> None:
    typer.echo(message, nl=nl)


def ask(prompt: str, parse: Callable[[str], T], read_line: ReadLine = stdin_line, out: Echo = echo) -> T:
    """Show ``prompt``, read a line and return ``parse(line)``; a refused answer is reported (indented, one line)
    and asked again. ``EndOfInput`` when the input ends first."""
    while True:
        out(prompt, nl=False)
        line = read_line()
        if line is None:
            out("")
            raise EndOfInput
        try:
            return parse(line)
        except AnswerError as exc:
            out(f"  {exc}")
