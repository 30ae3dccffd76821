"""Options and option values several commands share: ``--json``, one name from a fixed set, comma-separated lists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import typer

from gristmill.cli.output import fail

V = TypeVar("V")

JSON_OPTION = typer.Option(False, "--json", help="print JSON")


def choice(value: str, choices: Mapping[str, V], option: str) -> V:
    """The value ``value`` names in ``choices``; any other name is a usage error listing the choices."""
    if value not in choices:
        fail(f"{option} must be one of {', '.join(choices)}, got {value!r}", code=2)
    return choices[value]


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the non-empty names, stripped, in order."""
    return [part.strip() for part in text.split(",") if part.strip()]
