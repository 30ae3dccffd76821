"""A SIGTERM to ``gristmill demo`` stops the embedded platform it started (the platform runs in a session of its
own, so nothing else would): the demo exits with 128 + 15 and no process of the platform is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GRISTMILL = Path(sys.executable).with_name("gristmill")


def _platform_pids(data_dir: Path) -> list[int]:
    """Processes running ``gristmill.standalone`` on ``data_dir`` (found in /proc: the demo prints no pid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gristmill.standalone" in command and str(data_dir).encode() in b" ".join(command):
            pids.append(int(entry.name))
    return pids


def test_sigterm_to_the_demo_stops_the_platform_it_started(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        demo = subprocess.Popen(
            [str(GRISTMILL), "demo", "--task", "chat", "--tiny", "--data-dir", str(data_dir)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 180
        while "services:" not in out.read_text(errors="replace"):
            assert demo.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "the platform did not start: " + out.read_text(errors="replace")
            time.sleep(0.5)
        platform = _platform_pids(data_dir / "platform")
        assert platform, "no platform process found for " + str(data_dir)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(120) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _platform_pids(data_dir / "platform") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _platform_pids(data_dir / "platform"), "the platform outlived the demo"
    finally:
        if demo.poll() is None:
            demo.kill()
        # A platform left behind is stopped as the demo should have (SIGTERM: it stops its Ray too), then killed.
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 0.0)):
            for pid in _platform_pids(data_dir / "platform"):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while _platform_pids(data_dir / "platform") and time.monotonic() < deadline:
                time.sleep(0.5)
