"""Value types every service shares: what an object reference, a model signature and the default
organisation are. Plain frozen dataclasses (no protobuf, no SQL), so domain packages may use them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
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


def utc_now() -> datetime:
    """Now, timezone-aware in UTC: the clock every service's domain and store default to."""
    return datetime.now(UTC)


# The organisation of an installation that has only one (embedded mode, requests with an empty id).
DEFAULT_ORGANIZATION = "default"


@dataclass(frozen=True)
class FileRef:
    """An immutable object with what a reader needs to verify it (``common.v1.ObjectRef``)."""

    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, as the Open Inference Protocol describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
