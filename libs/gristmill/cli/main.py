"""``gristmill``: run the platform and drive it from a terminal.

Every command talks to the services over gRPC (``gristmill.client``). Output is a human-readable table by
default and JSON with ``--json``; an error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer

from gristmill.cli.processes import DEFAULT_PORTS, SERVICES, ServiceProcess, health, wait_serving
from gristmill.core.errors import GristmillError

app = typer.Typer(help="Gristmill: label → train → register → serve, on your own machines.", no_args_is_help=True)

REPO_ROOT = Path(__file__).resolve().parents[3]
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"gristmill: {message}", err=True)
    raise typer.Exit(code)


def one_line_errors(fn: F) -> F:
    """Turn platform errors into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GristmillError as exc:
            fail(f"{type(exc).__name__.removesuffix('Error').lower() or 'error'}: {exc}")
        except (OSError, subprocess.CalledProcessError) as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def emit(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    """Print rows as an aligned table, or as JSON."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo("(none)")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        typer.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def run_dir() -> Path:
    return Path(os.environ.get("GRISTMILL_RUN_DIR", REPO_ROOT / ".run"))


def stack_script() -> Path:
    script = REPO_ROOT / "deploy" / "local" / "stack.sh"
    if not script.exists():
        fail("this command needs a source checkout of Gristmill (deploy/local/stack.sh is missing)")
    return script


def service_processes() -> list[ServiceProcess]:
    return [ServiceProcess(name, f"gristmill.{name}", run_dir()) for name in SERVICES]


def local_stack_env() -> dict[str, str]:
    """What every service process gets in the local stack: the real Kafka and S3, its own data dir."""
    kafka_port = os.environ.get("GRISTMILL_KAFKA_PORT", "9092")
    s3_port = os.environ.get("GRISTMILL_S3_PORT", "8333")
    env = {
        "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": os.environ.get(
            "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{kafka_port}"
        ),
        "GRISTMILL_S3_ENDPOINT": os.environ.get("GRISTMILL_S3_ENDPOINT", f"127.0.0.1:{s3_port}"),
        "GRISTMILL_S3_ACCESS_KEY": os.environ.get("GRISTMILL_S3_ACCESS_KEY", "gristmill"),
        "GRISTMILL_S3_SECRET_KEY": os.environ.get("GRISTMILL_S3_SECRET_KEY", "gristmill-secret"),
        "GRISTMILL_SERVING_REGISTRY_ADDRESS": f"127.0.0.1:{DEFAULT_PORTS['registry']}",
        "HF_HUB_OFFLINE": "1",
    }
    for name in SERVICES:
        env[f"GRISTMILL_{name.upper()}_DATA_DIR"] = str(run_dir() / "services" / name)
    return env


@app.command()
@one_line_errors
def up(timeout: float = typer.Option(120.0, help="seconds to wait for each service")) -> None:
    """Start the local stack: Kafka, the S3 server, and each service as its own process."""
    subprocess.run([str(stack_script()), "up"], check=True)
    env = local_stack_env()
    for proc in service_processes():
        pid = proc.start(env)
        typer.echo(f"{proc.name}: starting (pid {pid}, log {proc.log_file})")
    for proc in service_processes():
        address = f"127.0.0.1:{DEFAULT_PORTS[proc.name]}"
        wait_serving(address, timeout, process=proc)
        typer.echo(f"{proc.name}: serving on {address}")


@app.command()
@one_line_errors
def down(keep_stack: bool = typer.Option(False, help="stop the services but leave Kafka and S3 running")) -> None:
    """Stop the services (they drain in-flight calls), then Kafka and the S3 server."""
    for proc in reversed(service_processes()):
        typer.echo(f"{proc.name}: {'stopped' if proc.stop() else 'not running'}")
    if not keep_stack:
        subprocess.run([str(stack_script()), "down"], check=True)


@app.command()
@one_line_errors
def status(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Health of each service on its default port."""
    rows = [
        {"service": name, "address": f"127.0.0.1:{port}", "health": health(f"127.0.0.1:{port}")}
        for name, port in DEFAULT_PORTS.items()
    ]
    emit(rows, as_json)
    if any(r["health"] != "SERVING" for r in rows):
        raise typer.Exit(1)


@app.command()
@one_line_errors
def dev(
    data_dir: Path = typer.Option(Path(".data/dev"), help="where the embedded services keep their data"),
) -> None:
    """Embedded mode: every service in one process on loopback, SQLite, local files, in-process bus."""
    command = [sys.executable, "-m", "gristmill.standalone", "--data-dir", str(data_dir)]
    typer.echo("starting the embedded platform (Ctrl-C stops it)")
    try:
        raise typer.Exit(subprocess.call(command))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
