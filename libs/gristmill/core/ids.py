"""Validated identifiers.

Object-store keys, topic names and file paths are built only from values that passed one of
these checks, never from raw user strings (no ``..``, no separators, no control characters).
"""

from __future__ import annotations

import re
import uuid

from gristmill.core.errors import InvalidArgumentError

# Lower-case slug: starts with a letter or digit, then letters, digits, '-', '_' or '.';
# never '..' (checked separately) and at most 128 characters.
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def validate_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` if it is a safe identifier, else raise ``InvalidArgumentError`` naming ``what``."""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{what} must not be empty")
    if not _ID.fullmatch(value) or ".." in value:
        raise InvalidArgumentError(
            f"{what} {value[:64]!r} is not valid: use 1-128 lower-case letters, digits, '.', '-' or '_', "
            "starting with a letter or digit"
        )
    return value


def new_id() -> str:
    """A fresh random identifier (UUID4 hex), valid for ``validate_id``."""
    return uuid.uuid4().hex
