"""Options and option values several commands share: ``--json``, one name from a fixed set, comma-separated lists,
protobuf messages read from JSON files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import typer
from google.protobuf import json_format
from google.protobuf.message import Message

from gristmill.cli.output import fail

V = TypeVar("V")
M = TypeVar("M", bound=Message)

JSON_OPTION = typer.Option(False, "--json", help="print JSON")


def choice(value: str, choices: Mapping[str, V], option: str) -> V:
    """The value ``value`` names in ``choices``; any other name is a usage error listing the choices."""
    if value not in choices:
        fail(f"{option} must be one of {', '.join(choices)}, got {value!r}", code=2)
    return choices[value]


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the non-empty names, stripped, in order."""
    return [part.strip() for part in text.split(",") if part.strip()]


def read_text_option(path: Path | None, option: str) -> str:
    """The UTF-8 text of the file an option names ("" when the option was not given); a missing or unreadable
    file is a one-line usage error naming the option."""
    if path is None:
        return ""
    if not path.is_file():
        fail(f"{option} {path}: no such file", code=2)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{option} {path}: cannot be read as UTF-8 text ({type(exc).__name__})", code=2)


def message_from_json_file(path: Path, message: M, *, what: str, option: str = "") -> M:
    """``message`` filled from the protobuf JSON in ``path``; a missing or unparseable file is a one-line usage
    error naming ``option`` (if given), the file and ``what`` it should hold."""
    where = f"{option} {path}" if option else str(path)
    if not path.is_file():
        fail(f"{where}: no such file", code=2)
    try:
        json_format.Parse(path.read_text(encoding="utf-8"), message)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        fail(f"{where}: not {what} in JSON: {first_line}", code=2)
    return message
