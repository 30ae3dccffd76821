"""``ServiceProcess.exited``: a child that died is seen as ended, a running one is not (waitpid, not /proc)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gristmill.cli.processes import ServiceProcess, wait_serving
from gristmill.core.errors import UnavailableError


def test_a_child_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    proc = ServiceProcess("broken", "gristmill_no_such_module", tmp_path)
    proc.start({})
    with pytest.raises(UnavailableError, match="broken exited during start-up"):
        wait_serving("127.0.0.1:9", 30, process=proc)
    assert proc.exited() and proc.pid() is None


def test_a_running_child_is_not_ended(tmp_path: Path) -> None:
    proc = ServiceProcess("sleeper", "gristmill_sleeper", tmp_path)
    (tmp_path / "gristmill_sleeper.py").write_text("import time\ntime.sleep(30)\n")
    proc.start({"PYTHONPATH": str(tmp_path)})
    try:
        time.sleep(0.5)
        assert not proc.exited()
        assert proc.pid() is not None
    finally:
        proc.stop(timeout_s=5)
    assert proc.exited()
