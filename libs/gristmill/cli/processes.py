"""Starting, watching and stopping Gristmill service processes on this machine (``gristmill up/down/dev``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.core.errors import UnavailableError
from gristmill.core.tls import TLS_VARIABLES, TlsSettings, channel_credentials, diagnose_handshake

# Start order: admin first (the others verify API keys there), the registry before serving (which loads from it).
SERVICES = ("admin", "registry", "labeling", "training", "serving")


@dataclass(frozen=True)
class ServiceProcess:
    """One service run as ``python -m <module>``, with a pid file and a log under ``run_dir``."""

    name: str
    module: str
    run_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The running process's pid, or None (a stale pid file counts as not running)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            return None
        return pid if self.module in cmdline else None

    def exited(self) -> bool:
        """Whether the process named by the pid file has ended. For a child of this process (started by this
        command) ``waitpid`` says so for certain; the pid file and ``/proc`` check of ``pid`` is for processes an
        earlier command started (a child read there too early can still show this command's own command line)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return True
        try:
            ended, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return self.pid() is None
        return ended == pid

    def start(self, env: Mapping[str, str]) -> int:
        """Start in its own session (it outlives the CLI); no-op when already running."""
        running = self.pid()
        if running is not None:
            return running
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # Whether a service serves TLS is the caller's choice (``env``), not what this shell exported for its
        # own client certificate.
        inherited = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES}
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**inherited, **env},
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM (the service drains), then SIGKILL after ``timeout_s``; False when it was not running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_file.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""


def _open(address: str, tls: TlsSettings | None) -> grpc.Channel:
    credentials = channel_credentials(tls) if tls is not None else None
    return grpc.secure_channel(address, credentials) if credentials is not None else grpc.insecure_channel(address)


def health(address: str, timeout_s: float = 2.0, *, tls: TlsSettings | None = None) -> str:
    """The overall health of the server at ``address`` ('SERVING', 'NOT_SERVING', ...) or 'DOWN'; over mTLS with
    ``tls`` (the client certificate)."""
    with _open(address, tls) as channel:
        try:
            # The typeshed stub types HealthStub for aio channels only.
            stub: Any = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_serving(
    address: str, timeout_s: float, *, process: ServiceProcess | None = None, tls: TlsSettings | None = None
) -> None:
    """Wait until ``address`` answers SERVING (over mTLS with ``tls``); fail early when ``process`` died (naming
    its last log line) or when the server refuses our handshake or we its (a TLS stack checked without
    ``--tls``, say: the one-line reason from ``diagnose_handshake``)."""
    deadline = time.monotonic() + timeout_s
    service = process.name if process is not None else ""
    where = f"; see {process.log_file}" if process is not None else ""
    while time.monotonic() < deadline:
        if health(address, timeout_s=1.0, tls=tls) == "SERVING":
            return
        if process is not None and process.exited():
            raise UnavailableError(
                f"{process.name} exited during start-up ({process.last_log_line() or 'no output'}); "
                f"see {process.log_file}"
            )
        if tls_problem := diagnose_handshake(address, tls, service=service):
            raise UnavailableError(f"{address} is not healthy: {tls_problem}{where}")
        time.sleep(0.3)
    raise UnavailableError(f"{address} did not become healthy within {timeout_s:.0f} s{where}")


def wait_http(url: str, timeout_s: float, *, process: ServiceProcess | None = None) -> None:
    """Wait until ``url`` answers 200 (an HTTP server's health page); fail early when ``process`` died."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    where = f"; see {process.log_file}" if process is not None else ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process is not None and process.exited():
            raise UnavailableError(
                f"{process.name} exited during start-up ({process.last_log_line() or 'no output'}){where}"
            )
        time.sleep(0.3)
    raise UnavailableError(f"{url} did not answer within {timeout_s:.0f} s{where}")
