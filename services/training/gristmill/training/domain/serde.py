"""Domain dataclasses to and from JSON-compatible values, for the store's JSON columns.

One generic converter driven by the type hints, so adding a field to a dataclass needs no mapping code.
Handles frozen dataclasses, ``tuple[X, ...]``, ``dict[str, X]``, ``X | None``, ``StrEnum`` and ``datetime``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from datetime import datetime
from typing import Any, TypeVar, Union, cast, get_args, get_origin, get_type_hints

T = TypeVar("T")

_HINTS: dict[type, dict[str, Any]] = {}


def to_data(value: Any) -> Any:
    """``value`` as JSON-compatible data (dicts, lists, strings, numbers, None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def from_data(cls: type[T], data: Any) -> T:
    """The inverse of ``to_data`` for a dataclass type ``cls``; unknown keys are ignored, missing ones default."""
    return cast(T, _decode(cls, data))


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _decode(tp: Any, data: Any) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if data is None:
            return None
        options = [a for a in get_args(tp) if a is not type(None)]
        return _decode(options[0], data)
    if origin is tuple:
        args = get_args(tp)
        return tuple(_decode(args[0], v) for v in data)
    if origin is list:
        return [_decode(get_args(tp)[0], v) for v in data]
    if origin is dict:
        value_type = get_args(tp)[1]
        return {k: _decode(value_type, v) for k, v in data.items()}
    if origin is typing.Literal:
        return data
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        kwargs = {f.name: _decode(hints[f.name], data[f.name]) for f in dataclasses.fields(tp) if f.name in data}
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is datetime:
        return datetime.fromisoformat(data)
    if tp is float and isinstance(data, int):
        return float(data)
    return data
