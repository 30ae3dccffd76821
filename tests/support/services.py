"""Processes of the local stack for the end-to-end and chaos tests: free ports, and a service killed and restarted."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gristmill.client import Endpoints


def free_port_block(size: int = 5) -> int:
    """A base port such that ``base .. base + size - 1`` are all free on 127.0.0.1."""
    for _ in range(200):
        # Below the kernel's ephemeral range (32768-60999 here): a port checked free there can be taken, before
        # the service binds it, by any outgoing connection or by a Ray process binding port 0 (it happened:
        # "training exited during start-up (Failed to bind to address 127.0.0.1:59294)"). Above Ray's worker
        # ports (10002-19999) and below the second stack's S3 ports (28333 and up).
        base = random.randrange(21000, 28000)
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no block of free ports")


def restart_service(run_dir: Path, service: str) -> tuple[int, int]:
    """SIGKILL a service of the local stack in ``run_dir`` (no drain, no goodbye to Kafka), then start it again
    exactly as it was started (same environment, same log). Returns the old and the new pid."""
    pid_file = run_dir / "pids" / f"{service}.pid"
    old = int(pid_file.read_text())
    environ = Path(f"/proc/{old}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{old}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    with (run_dir / "logs" / f"{service}.log").open("ab") as log:
        new = subprocess.Popen(
            [sys.executable, "-m", f"gristmill.{service}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        ).pid
    pid_file.write_text(f"{new}\n")
    return old, new


def gristmill_process(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``gristmill ARGS`` as its own process (from the repository's root), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gristmill.cli.main", *args],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class LocalRunFiles:
    """What a ``gristmill demo --stack local`` run left in its run directory, for a test's record of the run (a
    dataclass with ``summary``, the demo's JSON summary, and ``run_dir``)."""

    summary: dict[str, Any]
    run_dir: Path

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(**self.summary["endpoints"])

    @property
    def api_key(self) -> str:
        """The root admin key the admin service wrote at its first start (the demo used it too)."""
        return (self.run_dir / "services" / "admin" / "root-admin.key").read_text().strip()

    def log(self, service: str) -> str:
        return (self.run_dir / "logs" / f"{service}.log").read_text(errors="replace")
