"""``python -m gristmill.serving`` as a process on the real Kafka and S3: it reads its settings from the
environment, serves health and both APIs, refuses a bad setting with one line naming it, and stops cleanly
on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.integration


def _environment(tmp_path: Path, kafka: str, s3: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "GRISTMILL_SERVING_DATA_DIR": str(tmp_path),
        "GRISTMILL_SERVING_GRPC_PORT": "0",
        "GRISTMILL_SERVING_CONSUMER_GROUP": f"serving-process-{uuid.uuid4().hex[:8]}",
        "GRISTMILL_SERVING_SHUTDOWN_GRACE_S": "2",
        "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "GRISTMILL_S3_ENDPOINT": s3["endpoint"],
        "GRISTMILL_S3_ACCESS_KEY": s3["access_key"],
        "GRISTMILL_S3_SECRET_KEY": s3["secret_key"],
        "GRISTMILL_S3_BUCKET": "gristmill-test",
    }


def test_the_service_process_serves_and_stops_on_sigterm(
    tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "gristmill.serving"],
        env=_environment(tmp_path, kafka_bootstrap, s3_endpoint),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        port = 0
        deadline = time.monotonic() + 120
        lines = []
        while not port and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"serving gRPC on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else 0
        assert port, "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=10).live
            listed = serving_pb2_grpc.ServingServiceStub(channel).ListDeployments(
                serving_pb2.ListDeploymentsRequest(), timeout=10
            )
            assert list(listed.deployments) == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        rest = process.stderr.read()
        assert "received a stop signal" in rest and "stopped" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_bad_setting_stops_the_process_with_one_line_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gristmill.serving"],
        env={**os.environ, "GRISTMILL_SERVING_DATA_DIR": str(tmp_path), "GRISTMILL_SERVING_TORCH_THREADS": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("invalid setting GRISTMILL_SERVING_TORCH_THREADS='-1'")
    assert len(result.stderr.strip().splitlines()) == 1
