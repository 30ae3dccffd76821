"""One way to turn domain values (dataclasses, enums, tuples, datetimes) into JSON and back.

Stores keep some structured fields as JSON columns; events and manifests carry JSON too. pydantic's
``TypeAdapter`` validates plain dataclasses without changing them, so one cached adapter per type replaces a
hand-written ``to_dict``/``from_dict`` pair per type (and a malformed value is a ``ValueError`` naming the field).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    # Building an adapter compiles a validator (milliseconds); a store calls this per row.
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def to_plain(value: Any, kind: Any = None) -> Any:
    """``value`` as JSON-able Python values (dicts, lists, str, numbers); ``kind`` defaults to its type."""
    return _adapter(type(value) if kind is None else kind).dump_python(value, mode="json")


def from_plain(kind: type[T], data: Any) -> T:
    """A ``kind`` built and validated from JSON-able values; ``ValueError`` names what is wrong."""
    try:
        result: T = _adapter(kind).validate_python(data)
    except ValidationError as exc:
        raise ValueError(f"not a valid {getattr(kind, '__name__', kind)}: {exc}") from None
    return result


def to_json(value: Any, kind: Any = None) -> bytes:
    return _adapter(type(value) if kind is None else kind).dump_json(value)


def from_json(kind: type[T], data: bytes | str) -> T:
    try:
        result: T = _adapter(kind).validate_json(data)
    except ValidationError as exc:
        raise ValueError(f"not a valid {getattr(kind, '__name__', kind)}: {exc}") from None
    return result
