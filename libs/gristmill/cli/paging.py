"""Listing commands that page: one page (with a hint when there is more), or every page with ``--all``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from gristmill.api.common.v1 import common_pb2

T = TypeVar("T")

# Every page of a listing is at most this many pages away: a server that never stops answering a token is a bug,
# not a reason to loop forever.
MAX_PAGES = 10_000

PAGE_SIZE_OPTION = typer.Option(0, "--page-size", min=0, max=1000, help="items per page (0: the service's default, 50)")
PAGE_TOKEN_OPTION = typer.Option("", "--page-token", help="continue a listing where a previous page ended")
ALL_OPTION = typer.Option(False, "--all", help="follow the page tokens and list everything")


def collect(
    fetch: Callable[[common_pb2.PageRequest], tuple[list[T], str]],
    *,
    page_size: int = 0,
    page_token: str = "",
    every_page: bool = False,
) -> tuple[list[T], str]:
    """One page from ``page_token`` (or every page from there when ``every_page``); returns the items and the
    token of the next page ('' when the listing is complete)."""
    items: list[T] = []
    token = page_token
    for _ in range(MAX_PAGES):
        page, token = fetch(common_pb2.PageRequest(page_size=page_size, page_token=token))
        items.extend(page)
        if not every_page or not token:
            return items, token
    raise RuntimeError(f"the listing did not end after {MAX_PAGES} pages")


def more_hint(token: str) -> None:
    """On stderr (so that ``--json`` stays parseable): how to get the rest of a partial listing."""
    if token:
        typer.echo(f"more items: add --all, or --page-token {token}", err=True)
