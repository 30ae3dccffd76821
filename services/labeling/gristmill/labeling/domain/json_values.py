"""How JSON values read in error messages, for the parsers and the task types that check records."""

from __future__ import annotations

from typing import Any


def json_type(value: Any) -> str:
    """How a JSON value's type reads in an error message ("an array", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
