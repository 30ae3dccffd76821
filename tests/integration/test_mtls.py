"""mTLS: a service configured for it serves clients with a certificate from its CA, and no one else."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.core.errors import ConfigurationError
from gristmill.core.tls import TlsSettings, channel_credentials, server_credentials
from tests.conftest import REPO_ROOT
from tests.support.sample_server import build_server

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


async def test_client_with_a_certificate_from_the_ca_is_served(certs: Path) -> None:
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
