"""A test whose server is missing must FAIL with a clear line, never skip (CI=true or not)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("test_id", "variable", "server"),
    [
        ("tests/integration/test_storage_s3.py::test_missing_object_in_real_bucket", "GRISTMILL_S3_ENDPOINT", "S3"),
        ("tests/integration/test_events_kafka.py", "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS", "Kafka"),
    ],
)
def test_integration_test_without_its_server_fails(test_id: str, variable: str, server: str) -> None:
    env = {**os.environ, "CI": "true", variable: "127.0.0.1:1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", test_id, "-x", "-q", "-p", "no:cacheprovider", "--no-header"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "skipped" not in run.stdout
    assert "is not reachable at 127.0.0.1:1" in run.stdout
