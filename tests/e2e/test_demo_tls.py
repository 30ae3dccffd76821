"""End to end with mTLS on: ``gristmill up --tls`` (every service its own certificate, service-to-service calls
over mTLS), the demo's loop run against it with the ``client`` certificate, ``gristmill status`` over TLS, a
certificate renewed on SIGHUP, and clients without the right certificate refused with one clear line each.

Isolation as in test_demo.py: five free ports, a temporary run directory (its certificates, pid files, logs and
the names of its PostgreSQL databases, dropped at the end) and consumer groups with a unique suffix. Lighter than
test_demo.py: fewer items and one epoch (this module checks the transport, not the model), no registry restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.cli.platforms import LocalStack
from gristmill.client import ClientOptions, Endpoints, Gristmill, UnavailableError
from gristmill.core.tls import TLS_VARIABLES, TlsSettings, tls_files
from tests.conftest import REPO_ROOT
from tests.support.services import free_port_block

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

SERVICES = ("admin", "labeling", "training", "registry", "serving")


@dataclass
class TlsRun:
    summary: dict[str, Any]
    run_dir: Path
    base_port: int
    env: dict[str, str]  # the test's environment without any GRISTMILL_TLS_* (a plaintext client)

    @property
    def certs(self) -> Path:
        return self.run_dir / "certs"

    @property
    def endpoints(self) -> Endpoints:
        return LocalStack(self.run_dir, base_port=self.base_port).endpoints

    @property
    def endpoints_option(self) -> str:
        return " ".join(f"{k}={v}" for k, v in vars(self.endpoints).items())

    @property
    def api_key(self) -> str:
        return (self.run_dir / "services" / "admin" / "root-admin.key").read_text().strip()

    def client_env(self, certs: Path | None = None, ca: Path | None = None) -> dict[str, str]:
        """The test's environment with a client certificate (ours by default) and the CA the client trusts."""
        files = tls_files(certs or self.certs, "client")
        files["GRISTMILL_TLS_CA_FILE"] = str(ca or self.certs / "ca.pem")
        return {**self.env, **files}

    def client_tls(self) -> TlsSettings:
        return TlsSettings(
            cert_file=self.certs / "client.pem", key_file=self.certs / "client.key", ca_file=self.certs / "ca.pem"
        )


def _client(run: TlsRun) -> Gristmill:
    return Gristmill(run.endpoints, ClientOptions(timeout_s=30, api_key=run.api_key, tls=run.client_tls()))


def _gristmill(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gristmill.cli.main", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def tls_run(
    kafka_bootstrap: str, s3_endpoint: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRun]:
    run_dir = tmp_path_factory.mktemp("tls-run")
    work = tmp_path_factory.mktemp("tls-work")
    base_port = free_port_block()
    common = ["--run-dir", str(run_dir), "--base-port", str(base_port)]
    suffix = f"e2e-tls-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES} | {
        "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "GRISTMILL_S3_ENDPOINT": s3_endpoint["endpoint"],
        "GRISTMILL_S3_ACCESS_KEY": s3_endpoint["access_key"],
        "GRISTMILL_S3_SECRET_KEY": s3_endpoint["secret_key"],
    }
    env.pop("GRISTMILL_API_KEY", None)
    try:
        up = _gristmill("up", "--tls", *common, "--group-suffix", suffix, env=env)
        assert up.returncode == 0, f"gristmill up --tls failed:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
        assert "mTLS is on" in up.stdout
        run = TlsRun({}, run_dir, base_port, env)
        demo = _gristmill(
            "--endpoints", run.endpoints_option, "--api-key", run.api_key,
            "demo", "--no-start", "--items", "120", "--epochs", "1", "--data-dir", str(work),
            "--json", "--timeout", "300",
            env=run.client_env(), timeout=360,
        )  # fmt: skip
        assert demo.returncode == 0, f"the demo over mTLS failed ({demo.returncode}):\n{demo.stderr[-4000:]}"
        run.summary = json.loads(demo.stdout)
        yield run
    finally:
        _gristmill("down", "--keep-stack", *common, env=env)
        with contextlib.suppress(Exception):
            LocalStack(run_dir, base_port=base_port, group_suffix=suffix).drop_databases()


def test_the_loop_closes_over_mtls_with_a_certificate_per_service(tls_run: TlsRun) -> None:
    s = tls_run.summary
    assert s["stack"] == "running"
    assert s["lineage"]["matches_published"] is True and s["lineage"]["model_versions"] == 1
    assert s["predictions"]["oip"] == 8 and s["predictions"]["oip_agrees"] is True
    # Every service runs with its own certificate (and the CA): nothing is shared but the CA.
    for service in SERVICES:
        pid = int((tls_run.run_dir / "pids" / f"{service}.pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        assert env["GRISTMILL_TLS_CERT_FILE"] == str(tls_run.certs / f"{service}.pem")
        assert env["GRISTMILL_TLS_KEY_FILE"] == str(tls_run.certs / f"{service}.key")
        assert env["GRISTMILL_TLS_CA_FILE"] == str(tls_run.certs / "ca.pem")
    # The SDK with the client certificate: the API key is verified by the registry at the admin service, and
    # serving loaded its model from the registry, both over mTLS.
    with _client(tls_run) as gm:
        deployment = gm.serving.GetDeployment(sv.GetDeploymentRequest(name=s["deployment"]))
        versions = gm.registry.ListModelVersions(rg.ListModelVersionsRequest(registered_model_name=s["model"]))
    assert deployment.status.state == sv.DEPLOYMENT_STATE_READY
    assert [v.version for v in versions.model_versions] == [1]


def test_status_sees_every_service_over_tls_and_says_why_a_plaintext_client_does_not(tls_run: TlsRun) -> None:
    status = _gristmill("--endpoints", tls_run.endpoints_option, "status", "--json", env=tls_run.client_env())
    assert status.returncode == 0, status.stderr
    assert {r["service"]: r["health"] for r in json.loads(status.stdout)} == dict.fromkeys(SERVICES, "SERVING")
    plain = _gristmill("--endpoints", tls_run.endpoints_option, "status", "--json", env=tls_run.env)
    assert plain.returncode == 1
    assert {r["health"] for r in json.loads(plain.stdout)} == {"DOWN"}
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == len(SERVICES)
    for service, line in zip(sorted(SERVICES), sorted(lines), strict=True):
        assert line.startswith(f"gristmill: TLS: the {service} service at 127.0.0.1:")
        assert line.endswith("speaks TLS but this client is plaintext; set GRISTMILL_TLS_CERT_FILE/KEY_FILE/CA_FILE "
                             "(a client certificate)")  # fmt: skip


def test_clients_without_the_right_certificate_are_refused_in_one_clear_line(tls_run: TlsRun, tmp_path: Path) -> None:
    registry = tls_run.endpoints.registry
    # Plaintext, through the CLI: status UNAVAILABLE, one line.
    plain = _gristmill(
        "--endpoints", tls_run.endpoints_option, "--api-key", tls_run.api_key, "models", "list", env=tls_run.env
    )
    assert plain.returncode == 1
    assert plain.stderr.strip() == (
        f"gristmill: unavailable: TLS: the registry service at {registry} speaks TLS but this client is plaintext; "
        "set GRISTMILL_TLS_CERT_FILE/KEY_FILE/CA_FILE (a client certificate)"
    )
    # A client certificate from another CA (the client trusts the stack's CA, so only its own side is wrong).
    other = tmp_path / "other-ca"
    subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(other)], check=True, capture_output=True)
    foreign = _gristmill(
        "--endpoints", tls_run.endpoints_option, "--api-key", tls_run.api_key, "models", "list",
        env=tls_run.client_env(certs=other),
    )  # fmt: skip
    assert foreign.returncode == 1
    assert foreign.stderr.strip() == (
        f"gristmill: unavailable: TLS: the registry service at {registry} refused our certificate "
        f"{other / 'client.pem'} (unknown CA: it was not signed by the server's CA)"
    )
    # Our certificate, but trusting another CA: this side refuses the server.
    distrust = _gristmill(
        "--endpoints", tls_run.endpoints_option, "--api-key", tls_run.api_key, "models", "list",
        env=tls_run.client_env(ca=other / "ca.pem"),
    )  # fmt: skip
    assert distrust.returncode == 1 and len(distrust.stderr.strip().splitlines()) == 1
    assert distrust.stderr.strip().startswith(
        f"gristmill: unavailable: TLS: we refused the certificate of the registry service at {registry} (unknown CA"
    )
    # The SDK: the same line in an UnavailableError (status UNAVAILABLE), gRPC's own words kept in its details.
    plaintext = ClientOptions(timeout_s=10, max_attempts=1, tls=None)
    with (
        Gristmill(tls_run.endpoints, plaintext) as gm,
        pytest.raises(UnavailableError, match=r"^TLS: the registry service at .* speaks TLS") as err,
    ):
        gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=tls_run.summary["model"]))
    assert "transport" in err.value.details


def _served_certificate(address: str, tls: TlsSettings) -> bytes:
    """The DER certificate the server at ``address`` presents on a new connection."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(tls.ca_file))
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_renewed_certificate_is_served_after_sighup_without_a_restart(tls_run: TlsRun, tmp_path: Path) -> None:
    registry = tls_run.endpoints.registry
    pem = tls_run.certs / "registry.pem"
    before = _served_certificate(registry, tls_run.client_tls())
    assert before == ssl.PEM_cert_to_DER_cert(pem.read_text())
    # Renew: the same CA, a new key and serial (certs.sh keeps the CA it finds and makes what is missing).
    renewal = tmp_path / "renewal"
    renewal.mkdir()
    for name in ("ca.pem", "ca.key", "ca.srl"):
        if (tls_run.certs / name).exists():
            shutil.copy(tls_run.certs / name, renewal / name)
    subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(renewal)], check=True, capture_output=True)
    shutil.copy(renewal / "registry.pem", pem)
    shutil.copy(renewal / "registry.key", tls_run.certs / "registry.key")
    pid = int((tls_run.run_dir / "pids" / "registry.pid").read_text())
    log = tls_run.run_dir / "logs" / "registry.log"
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "reloaded TLS certificate from" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"reloaded TLS certificate from {pem}" in log.read_text(errors="replace")
    after = _served_certificate(registry, tls_run.client_tls())
    assert after != before and after == ssl.PEM_cert_to_DER_cert(pem.read_text())
    # Still the same process, still serving calls (the SDK's new channel).
    assert int((tls_run.run_dir / "pids" / "registry.pid").read_text()) == pid
    with _client(tls_run) as gm:
        model = gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=tls_run.summary["model"]))
    assert model.name == tls_run.summary["model"]
