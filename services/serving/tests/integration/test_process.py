"""``python -m gristmill.serving`` as a process on the real Kafka and S3: it reads its settings from the
environment, serves health and both APIs, refuses a bad setting with one line naming it, and stops cleanly
on SIGTERM."""

from __future__ import annotations

import asyncio
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
from gristmill.core.auth import SERVING_PREDICT
from services.admin.tests.support import ROOT, bearer, running_admin

pytestmark = pytest.mark.integration


def _environment(tmp_path: Path, kafka: str, s3: dict[str, str], admin_address: str) -> dict[str, str]:
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
        # Networked (Kafka configured): keys are verified at the admin service; auth cannot be switched off.
        "GRISTMILL_AUTH_ADMIN_ADDRESS": admin_address,
        "GRISTMILL_AUTH_ROOT_ORGANIZATION_ID": ROOT,
    }


def _serve_and_stop(env: dict[str, str], key: str) -> None:
    """Start the process, call it with and without ``key``, SIGTERM it (blocking: run it off the event loop)."""
    process = subprocess.Popen([sys.executable, "-m", "gristmill.serving"], env=env, stderr=subprocess.PIPE, text=True)
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
            serving = serving_pb2_grpc.ServingServiceStub(channel)
            listed = serving.ListDeployments(serving_pb2.ListDeploymentsRequest(), metadata=bearer(key), timeout=10)
            assert list(listed.deployments) == []
            with pytest.raises(grpc.RpcError) as refused:
                serving.ListDeployments(serving_pb2.ListDeploymentsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        rest = process.stderr.read()
        assert "received a stop signal" in rest and "stopped" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def test_the_service_process_serves_and_stops_on_sigterm(
    tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]
) -> None:
    async with running_admin(tmp_path) as admin:
        key = await admin.create_key(ROOT, SERVING_PREDICT)
        env = _environment(tmp_path / "serving", kafka_bootstrap, s3_endpoint, admin.address)
        # Off the event loop: the admin service answers the process's key checks on this loop meanwhile.
        await asyncio.to_thread(_serve_and_stop, env, key)


@pytest.mark.parametrize(("variable", "value"), [("TORCH_THREADS", "-1"), ("REPLICA", "Replica_1")])
def test_a_bad_setting_stops_the_process_with_one_line_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gristmill.serving"],
        env={**os.environ, "GRISTMILL_SERVING_DATA_DIR": str(tmp_path), f"GRISTMILL_SERVING_{variable}": value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"serving: invalid setting GRISTMILL_SERVING_{variable}='{value}'")
    assert len(result.stderr.strip().splitlines()) == 1
