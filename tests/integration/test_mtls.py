"""mTLS: a service configured for it serves clients with a certificate from its CA, and no one else; a refused
handshake is told in one line saying which side refused and why; renewed certificate files are served after a
reload (SIGHUP) without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as pb
from gristmill.cli.processes import health, wait_serving
from gristmill.client import ClientOptions, Endpoints, Gristmill, UnavailableError
from gristmill.core.errors import ConfigurationError
from gristmill.core.tls import (
    TlsSettings,
    channel_credentials,
    diagnose_handshake,
    reload_certificates,
    server_credentials,
)
from tests.conftest import REPO_ROOT
from tests.support.sample_server import build_server
from tests.support.tls import der
from tests.support.tls import served_certificate as _served

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def other_ca_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("other-certs")
    subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(out)], check=True, capture_output=True)
    return out


def _tls(d: Path, name: str, ca: Path | None = None) -> TlsSettings:
    return TlsSettings(cert_file=d / f"{name}.pem", key_file=d / f"{name}.key", ca_file=ca or d / "ca.pem")


async def _check(address: str, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_client_with_a_certificate_from_the_ca_isserved_certificate(certs: Path) -> None:
    server = build_server(server_credentials=server_credentials(_tls(certs, "registry")))
    async with server:
        creds = channel_credentials(_tls(certs, "client"))
        assert creds is not None
        assert await _check(f"localhost:{server.port}", creds) == health_pb2.HealthCheckResponse.SERVING


async def test_clients_without_a_valid_certificate_cannot_connect(certs: Path, other_ca_certs: Path) -> None:
    server = build_server(server_credentials=server_credentials(_tls(certs, "registry")))
    async with server:
        address = f"localhost:{server.port}"
        no_client_cert = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
        # A certificate from another CA (which trusts our server's CA, so only the client side is wrong).
        foreign = channel_credentials(_tls(other_ca_certs, "client", ca=certs / "ca.pem"))
        assert foreign is not None
        for creds in (no_client_cert, foreign):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _check(address, creds)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plain text is refused too.
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_tls_off_by_default_and_incomplete_settings_are_clear(certs: Path) -> None:
    assert server_credentials(TlsSettings()) is None
    with pytest.raises(ConfigurationError, match="GRISTMILL_TLS_KEY_FILE is not set"):
        server_credentials(TlsSettings(cert_file=certs / "registry.pem"))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        server_credentials(TlsSettings(cert_file=certs / "nope.pem", key_file=certs / "nope.key"))


# --------------------------------------------------------------------------- one clear line per refusal


def _cert(d: Path, name: str, san: str) -> None:
    """A certificate ``name`` in ``d`` signed by ``d``'s CA with only ``san`` as subjectAltName."""
    extfile = d / f"{name}.ext"
    extfile.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    subprocess.run(
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
         str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
         str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(extfile)],
        check=True, capture_output=True,
    )  # fmt: skip


async def test_each_refused_handshake_is_diagnosed_in_one_line(certs: Path, other_ca_certs: Path) -> None:
    tls_server = build_server(server_credentials=server_credentials(_tls(certs, "registry")))
    plain_server = build_server()
    async with tls_server, plain_server:
        address, plain = f"127.0.0.1:{tls_server.port}", f"127.0.0.1:{plain_server.port}"

        def diagnose(target: str, tls: TlsSettings | None) -> str | None:
            return diagnose_handshake(target, tls, service="registry")

        ours = _tls(certs, "client")
        assert await asyncio.to_thread(diagnose, address, ours) is None
        assert await asyncio.to_thread(diagnose, plain, None) is None
        assert await asyncio.to_thread(diagnose, address, None) == (
            f"TLS: the registry service at {address} speaks TLS but this client is plaintext; "
            "set GRISTMILL_TLS_CERT_FILE/KEY_FILE/CA_FILE (a client certificate)"
        )
        foreign = _tls(other_ca_certs, "client", ca=certs / "ca.pem")
        assert await asyncio.to_thread(diagnose, address, foreign) == (
            f"TLS: the registry service at {address} refused our certificate {other_ca_certs / 'client.pem'} "
            "(unknown CA: it was not signed by the server's CA)"
        )
        distrusting = _tls(certs, "client", ca=other_ca_certs / "ca.pem")
        assert await asyncio.to_thread(diagnose, address, distrusting) == (
            f"TLS: we refused the certificate of the registry service at {address} (unknown CA: it was not signed "
            f"by our CA, GRISTMILL_TLS_CA_FILE={other_ca_certs / 'ca.pem'})"
        )
        assert await asyncio.to_thread(diagnose, plain, ours) == (
            f"TLS: the registry service at {plain} does not speak TLS (a plaintext server) but GRISTMILL_TLS_* is "
            "set: unset GRISTMILL_TLS_CERT_FILE/KEY_FILE/CA_FILE or start the server with TLS"
        )
    # Nothing listens any more: not a TLS problem.
    assert diagnose_handshake(address, ours) is None


async def test_a_server_certificate_for_another_name_is_refused_by_the_client(tmp_path: Path, certs: Path) -> None:
    d = tmp_path / "san"
    shutil.copytree(certs, d)
    _cert(d, "elsewhere", "DNS:elsewhere.example")
    server = build_server(server_credentials=server_credentials(_tls(d, "elsewhere")))
    async with server:
        address = f"127.0.0.1:{server.port}"
        line = await asyncio.to_thread(diagnose_handshake, address, _tls(d, "client"))
    assert line is not None
    assert line.startswith(f"TLS: we refused the certificate of the server at {address} (")
    assert "127.0.0.1" in line and "mismatch" in line.lower()


async def test_the_sdk_raises_unavailable_with_the_diagnosis(certs: Path, other_ca_certs: Path) -> None:
    server = build_server(server_credentials=server_credentials(_tls(certs, "registry")))
    async with server:
        endpoints = Endpoints(serving=f"127.0.0.1:{server.port}")
        for tls, expected in (
            (None, "speaks TLS but this client is plaintext"),
            (_tls(other_ca_certs, "client", ca=certs / "ca.pem"), "refused our certificate"),
        ):
            options = ClientOptions(timeout_s=5, max_attempts=2, backoff_s=0.01, tls=tls)

            def call(options: ClientOptions = options) -> None:
                with Gristmill(endpoints, options) as gm:
                    gm.inference.ServerLive(pb.ServerLiveRequest())

            with pytest.raises(UnavailableError) as err:
                await asyncio.to_thread(call)
            assert err.value.grpc_code == grpc.StatusCode.UNAVAILABLE
            assert str(err.value).startswith(f"TLS: the serving service at {endpoints.serving} ")
            assert expected in str(err.value) and "\n" not in str(err.value)
            assert "transport" in err.value.details  # gRPC's own words, kept


def test_the_client_takes_its_certificate_from_the_environment(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GRISTMILL_TLS_CERT_FILE", "GRISTMILL_TLS_KEY_FILE", "GRISTMILL_TLS_CA_FILE"):
        monkeypatch.delenv(variable, raising=False)
    assert ClientOptions().tls is None
    monkeypatch.setenv("GRISTMILL_TLS_CERT_FILE", str(certs / "client.pem"))
    monkeypatch.setenv("GRISTMILL_TLS_KEY_FILE", str(certs / "client.key"))
    monkeypatch.setenv("GRISTMILL_TLS_CA_FILE", str(certs / "ca.pem"))
    assert ClientOptions().tls == _tls(certs, "client")
    assert ClientOptions(tls=None).tls is None  # plaintext when asked, whatever the environment says


# --------------------------------------------------------------------------- renewal without a restart


async def test_reloaded_certificate_files_are_served_to_new_connections(
    tmp_path: Path, certs: Path, other_ca_certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = tmp_path / "live"
    shutil.copytree(certs, live)
    server = build_server(server_credentials=server_credentials(_tls(live, "registry")))
    async with server:
        address = f"127.0.0.1:{server.port}"
        assert await asyncio.to_thread(_served, address, _tls(certs, "client")) == der(certs / "registry.pem")
        # Renewed with a new key and serial from the same CA: new connections get it after a reload.
        renewal = tmp_path / "renewal"
        shutil.copytree(certs, renewal)
        (renewal / "registry.pem").unlink()
        subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(renewal)], check=True, capture_output=True)
        assert der(renewal / "registry.pem") != der(certs / "registry.pem")
        shutil.copy(renewal / "registry.pem", live / "registry.pem")
        shutil.copy(renewal / "registry.key", live / "registry.key")
        with caplog.at_level(logging.INFO, logger="gristmill.core.tls"):
            reload_certificates()
        assert f"reloaded TLS certificate from {live / 'registry.pem'}" in caplog.text
        assert await asyncio.to_thread(_served, address, _tls(certs, "client")) == der(renewal / "registry.pem")
        # A bad file: refused, logged, and the running certificate stays.
        (live / "registry.pem").write_text("not a certificate\n")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gristmill.core.tls"):
            reload_certificates()
        assert "TLS certificate not reloaded, keeping the running one" in caplog.text
        assert f"reloaded TLS certificate from {live / 'registry.pem'}" not in caplog.text
        assert await asyncio.to_thread(_served, address, _tls(certs, "client")) == der(renewal / "registry.pem")
        # A new CA too (the certificate and the CA clients must present): clients of the new CA get in.
        for name in ("registry.pem", "registry.key", "ca.pem"):
            shutil.copy(other_ca_certs / name, live / name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gristmill.core.tls"):
            reload_certificates()
        assert f"reloaded TLS certificate from {live / 'registry.pem'}" in caplog.text
        new_ca_client = _tls(other_ca_certs, "client")
        assert await asyncio.to_thread(_served, address, new_ca_client) == der(other_ca_certs / "registry.pem")
        new_ca_credentials = channel_credentials(new_ca_client)
        assert new_ca_credentials is not None
        assert await _check(address, new_ca_credentials) == health_pb2.HealthCheckResponse.SERVING


def test_sighup_reloads_the_certificate_of_a_running_service(tmp_path: Path, certs: Path) -> None:
    """A real service process (the admin service on SQLite, embedded bus) with mTLS and a real SIGHUP."""
    live = tmp_path / "live"
    shutil.copytree(certs, live)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GRISTMILL_", "OTEL_"))},
        "PYTHONUNBUFFERED": "1",
        "GRISTMILL_ADMIN_GRPC_PORT": str(port),
        "GRISTMILL_ADMIN_DATA_DIR": str(tmp_path / "admin"),
        "GRISTMILL_TLS_CERT_FILE": str(live / "admin.pem"),
        "GRISTMILL_TLS_KEY_FILE": str(live / "admin.key"),
        "GRISTMILL_TLS_CA_FILE": str(live / "ca.pem"),
    }
    log = tmp_path / "admin.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gristmill.admin"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        address, client = f"127.0.0.1:{port}", _tls(certs, "client")
        wait_serving(address, 90, tls=client)
        assert _served(address, client) == der(certs / "admin.pem")
        renewal = tmp_path / "renewal"
        shutil.copytree(certs, renewal)
        (renewal / "admin.pem").unlink()
        subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(renewal)], check=True, capture_output=True)
        shutil.copy(renewal / "admin.pem", live / "admin.pem")
        shutil.copy(renewal / "admin.key", live / "admin.key")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reloaded TLS certificate from" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"reloaded TLS certificate from {live / 'admin.pem'}" in log.read_text()
        assert _served(address, client) == der(renewal / "admin.pem")
        assert proc.poll() is None
        assert health(address, tls=client) == "SERVING"
    finally:
        proc.terminate()
        proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
