"""How every command talks to its user: tables or JSON on stdout, one-line errors on stderr, exit statuses.

Exit statuses: 0 success, 1 an error the platform or the system reported (one line on stderr), 2 bad usage
(Typer's own, or ``fail(..., code=2)``), 130 interrupted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import wraps
from typing import Any, NoReturn, TypeVar

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.core.errors import GristmillError

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Message)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit with ``code``."""
    typer.echo(f"gristmill: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def confirm(action: str, yes: bool, consequence: str = "") -> None:
    """Go on only with ``--yes``, or when the person at the terminal answers yes to "``action``?" (asked on
    stderr, so that ``--json`` output stays clean). Without a terminal (scripts, pipes) nothing is asked: the
    command needs ``--yes`` and fails without it, exit status 2."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{action}: not confirmed; pass --yes to do it without being asked", code=2)
    question = f"{action}?" + (f" {consequence}" if consequence else "")
    if not typer.confirm(question, default=False, err=True):
        fail("cancelled: nothing was changed")


def error_kind(exc: GristmillError) -> str:
    """``NotFoundError`` → ``not found``: the status in words, for the one-line message."""
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def one_line_errors(fn: F) -> F:
    """Turn platform and system errors into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GristmillError as exc:
            fail(f"{error_kind(exc)}: {exc}")
        except (OSError, subprocess.CalledProcessError) as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def emit(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    """Print rows as an aligned table, or as JSON."""
    if as_json:
        typer.echo(json.dumps(list(rows), indent=2, default=str))
        return
    if not rows:
        typer.echo("(none)")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        typer.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def emit_messages(messages: Iterable[M], row: Callable[[M], Mapping[str, Any]], as_json: bool) -> None:
    """A list of messages: a table of ``row(message)``, or JSON of the whole messages."""
    items = list(messages)
    if as_json:
        emit([message_dict(m) for m in items], True)
    else:
        emit([row(m) for m in items], False)


def emit_object(fields: Mapping[str, Any], as_json: bool, *, raw: Message | None = None) -> None:
    """One object: ``key: value`` lines, or JSON (the whole message when ``raw`` is given)."""
    if as_json:
        typer.echo(json.dumps(message_dict(raw) if raw is not None else dict(fields), indent=2, default=str))
        return
    width = max((len(k) for k in fields), default=0)
    for key, value in fields.items():
        typer.echo(f"{key.ljust(width)}  {value}")


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data, with the proto field names."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def enum_name(value: str, prefix: str) -> str:
    """``TASK_TYPE_TEXT_CLASSIFICATION`` → ``text-classification`` (for tables)."""
    return value.removeprefix(prefix).lower().replace("_", "-")


def when(ts: Timestamp) -> str:
    """A timestamp for tables ('' when unset)."""
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"
