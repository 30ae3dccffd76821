"""Page tokens for every List call: opaque to callers, validated on the way back in.

A token is URL-safe base64 of a small JSON object: the position to continue after and a fingerprint of the
query it was issued for, so a token reused with other filters (or forged, or truncated) is INVALID_ARGUMENT
instead of silently returning the wrong page. The position is a string: a key for keyset paging (``after``),
or a row count for offset paging (``offset``), as ``common.v1.PageRequest`` documents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gristmill.core.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_VERSION = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    """A validated page request: at most ``size`` results after the position ``after`` (None: first page).

    ``query`` is the fingerprint the request was validated against; ``finish`` uses it for the next token.
    """

    size: int
    after: str | None = None
    query: str = ""

    @property
    def offset(self) -> int:
        """The position as a row count, for offset paging (0 on the first page)."""
        return int(self.after) if self.after else 0

    def fetch_limit(self) -> int:
        """Ask the store for one more than a page, to know whether another page follows."""
        return self.size + 1

    def finish(self, rows: Sequence[T], key: Callable[[T], str] | None = None) -> tuple[list[T], str]:
        """The page's rows (fetched with ``fetch_limit``) and the next page's token ('' on the last page).

        With ``key`` the next page continues after the last row's key (keyset paging); without, after this
        page's last row count (offset paging).
        """
        if len(rows) <= self.size:
            return list(rows), ""
        kept = list(rows[: self.size])
        after = key(kept[-1]) if key is not None else str(self.offset + self.size)
        return kept, next_page_token(after, self.query)


def fingerprint(kind: str, query: Any = None) -> str:
    """A short, stable digest of a query (its filters as JSON-able values)."""
    text = json.dumps([kind, query], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def page_request(page_size: int, page_token: str, query_fingerprint: str) -> Page:
    """Validate a PageRequest: size 0 -> default, above the maximum -> the maximum, negative -> refused."""
    if page_size < 0:
        raise InvalidArgumentError(f"page_size must not be negative (got {page_size}); 0 means {DEFAULT_PAGE_SIZE}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return Page(size=size, query=query_fingerprint)
    return Page(size=size, after=_decode(page_token, query_fingerprint), query=query_fingerprint)


def next_page_token(after: str | None, query_fingerprint: str) -> str:
    """The token for the page after ``after``; empty on the last page (``after`` None)."""
    if after is None:
        return ""
    raw = json.dumps({"v": _VERSION, "q": query_fingerprint, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode(token: str, query_fingerprint: str) -> str:
    bad = InvalidArgumentError("page_token is malformed: pass the next_page_token of the previous response unchanged")
    if len(token) > 2048:
        raise bad
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(data, dict) or data.get("v") != _VERSION or not isinstance(data.get("a"), str):
        raise bad
    if data.get("q") != query_fingerprint:
        raise InvalidArgumentError(
            "page_token was issued for a different query; repeat the filters of the first call or start over "
            "without a token"
        )
    after: str = data["a"]
    return after
