"""Commands that make one call and print its answer: one object, a list, or a listing's pages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import typer
from google.protobuf.message import Message

from gristmill.api.common.v1 import common_pb2
from gristmill.cli.context import state, want_json
from gristmill.cli.output import emit_messages, emit_object
from gristmill.cli.paging import collect, more_hint
from gristmill.client import Gristmill

M = TypeVar("M", bound=Message)


def show_one(
    ctx: typer.Context,
    call: Callable[[Gristmill], M],
    fields: Callable[[M], Mapping[str, Any]],
    as_json: bool,
) -> None:
    """Make ``call`` and print the message it returns: ``fields(message)``, or with ``--json`` the whole message."""
    with state(ctx).client() as gm:
        reply = call(gm)
    emit_object(fields(reply), want_json(ctx, as_json), raw=reply)


def show_list(
    ctx: typer.Context,
    call: Callable[[Gristmill], Iterable[M]],
    row: Callable[[M], Mapping[str, Any]],
    as_json: bool,
) -> None:
    """Make ``call`` and print the messages it returns: a table of ``row(message)``, or JSON."""
    with state(ctx).client() as gm:
        found = list(call(gm))
    emit_messages(found, row, want_json(ctx, as_json))


def show_pages(
    ctx: typer.Context,
    fetch: Callable[[Gristmill, common_pb2.PageRequest], tuple[Iterable[M], str]],
    row: Callable[[M], Mapping[str, Any]],
    as_json: bool,
    *,
    page_size: int,
    page_token: str,
    every_page: bool,
) -> None:
    """A paged listing: ``fetch(gm, page)`` returns one page's messages and the next token; prints one page (with
    a hint when there is more) or, with ``every_page``, all of them."""
    with state(ctx).client() as gm:

        def page_of(page: common_pb2.PageRequest) -> tuple[list[M], str]:
            found, token = fetch(gm, page)
            return list(found), token

        found, token = collect(page_of, page_size=page_size, page_token=page_token, every_page=every_page)
    emit_messages(found, row, want_json(ctx, as_json))
    more_hint(token)
