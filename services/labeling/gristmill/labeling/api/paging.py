"""Page tokens for List calls: an offset bound to the query it was issued for.

A token is opaque to clients (base64 of a small JSON object). Reusing it with other filters, or sending a
made-up one, is INVALID_ARGUMENT, as ``common.v1.PageRequest`` documents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from gristmill.api.common.v1 import common_pb2
from gristmill.core.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


@dataclass(frozen=True)
class Page:
    offset: int
    limit: int
    query: str

    def fetch_limit(self) -> int:
        """Ask the store for one more than a page, to know whether another page follows."""
        return self.limit + 1

    def finish(self, rows: Sequence[T]) -> tuple[list[T], str]:
        """The page's rows and the next page's token ('' on the last page)."""
        if len(rows) <= self.limit:
            return list(rows), ""
        return list(rows[: self.limit]), _encode(self.offset + self.limit, self.query)


def page_of(request: common_pb2.PageRequest, *query_parts: object) -> Page:
    """The page a request asks for; ``query_parts`` identify the query (project id, filters...)."""
    if request.page_size < 0:
        raise InvalidArgumentError(f"page.page_size must not be negative, got {request.page_size}")
    limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    query = hashlib.sha256(json.dumps([str(p) for p in query_parts]).encode()).hexdigest()[:16]
    offset = _decode(request.page_token, query) if request.page_token else 0
    return Page(offset, limit, query)


def _encode(offset: int, query: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset, "q": query}).encode()).decode().rstrip("=")


def _decode(token: str, query: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, issued_for = int(data["o"]), str(data["q"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgumentError(
            "page.page_token is malformed; pass the next_page_token of a previous response"
        ) from None
    if issued_for != query or offset < 0:
        raise InvalidArgumentError("page.page_token was issued for a different query; start again without a token")
    return offset
