"""Running ``gristmill`` commands in-process (Typer's runner) against a platform, and checking what they say."""

from __future__ import annotations

import json
import socket
from typing import Any

from typer.testing import CliRunner, Result

from gristmill.cli.main import app

runner = CliRunner()


def cli(platform: str, *args: str, input: str | None = None) -> Result:
    """``gristmill --endpoints <platform's READY line> ARGS...``."""
    return runner.invoke(app, ["--endpoints", platform, *args], input=input)


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stdout}\n{result.stderr}\n{result.exception!r}"
    return result.stdout


def refused(result: Result, kind: str, *fragments: str, code: int = 1) -> None:
    """A one-line error naming what went wrong, and a non-zero exit status."""
    assert result.exit_code == code, f"exit {result.exit_code}: {result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gristmill: {kind}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def usage_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stdout}\n{result.stderr}"
    assert fragment in result.stderr or fragment in result.stdout, result.stderr


def as_json(result: Result) -> Any:
    return json.loads(ok(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
