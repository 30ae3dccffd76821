"""mTLS on a service's own calls to other services: after a reload (SIGHUP) its clients of the admin service and
serving's registry source present the renewed certificate files, without being rebuilt and without a failed call;
files that cannot be used keep the running channel."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.admin.v1 import admin_pb2, admin_pb2_grpc
from gristmill.api.registry.v1 import registry_pb2, registry_pb2_grpc
from gristmill.core.auth import Principal
from gristmill.core.auth_quota import UsageKind
from gristmill.core.auth_remote import RemoteKeyVerifier, RemotePlanSource, RemoteUsageSource
from gristmill.core.errors import UnavailableError
from gristmill.core.grpcserver import GrpcServer, ServiceRegistration
from gristmill.core.storage.local import LocalObjectStore
from gristmill.core.tls import ReloadingChannel, TlsSettings, reload_certificates, server_credentials
from gristmill.serving.runtime.sources import RegistryModelSource
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

PRINCIPAL = Principal("acme", "key-1", frozenset({"admin"}))


def _certs(out: Path) -> Path:
    subprocess.run([str(REPO_ROOT / "deploy/local/certs.sh"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def new_ca_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _certs(tmp_path_factory.mktemp("new-ca-certs"))


def _tls(d: Path, name: str) -> TlsSettings:
    return TlsSettings(cert_file=d / f"{name}.pem", key_file=d / f"{name}.key", ca_file=d / "ca.pem")


def _install_client(source: Path, live: Path) -> None:
    """Write the client certificate, key and CA of ``source`` over those in ``live`` (a renewal)."""
    live.mkdir(exist_ok=True)
    for name in ("client.pem", "client.key", "ca.pem"):
        shutil.copy(source / name, live / name)


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer, admin_pb2_grpc.MeteringServiceServicer):
    """Answers WhoAmI, GetOrganization and GetUsage; WhoAmI with the key ``hold`` waits for ``release``."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()

    async def WhoAmI(self, request: admin_pb2.WhoAmIRequest, context: Any) -> admin_pb2.WhoAmIResponse:
        if dict(context.invocation_metadata()).get("authorization") == "Bearer hold":
            self.held.set()
            await asyncio.to_thread(self.release.wait, 10)
        return admin_pb2.WhoAmIResponse(organization_id="acme", api_key_id="key-1", scopes=["admin"])

    async def GetOrganization(self, request: admin_pb2.GetOrganizationRequest, context: Any) -> admin_pb2.Organization:
        return admin_pb2.Organization(organization_id=request.organization_id, plan=admin_pb2.Plan(name="team"))

    async def GetUsage(self, request: admin_pb2.GetUsageRequest, context: Any) -> admin_pb2.GetUsageResponse:
        return admin_pb2.GetUsageResponse(totals=[admin_pb2.UsageTotal(quantity=3.0)])


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    async def GetRegisteredModel(
        self, request: registry_pb2.GetRegisteredModelRequest, context: Any
    ) -> registry_pb2.RegisteredModel:
        return registry_pb2.RegisteredModel(name=request.name)


def _admin_server(tls: TlsSettings | None, admin: FakeAdmin | None = None) -> GrpcServer:
    servicer = admin or FakeAdmin()
    return GrpcServer(
        "admin",
        [
            ServiceRegistration(
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
                lambda server: admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server),
            ),
            ServiceRegistration(
                admin_pb2.DESCRIPTOR.services_by_name["MeteringService"],
                lambda server: admin_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server),
            ),
        ],
        server_credentials=server_credentials(tls) if tls is not None else None,
    )


def _registry_server(tls: TlsSettings) -> GrpcServer:
    servicer = FakeRegistry()
    return GrpcServer(
        "registry",
        [
            ServiceRegistration(
                registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
                lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server),
            )
        ],
        server_credentials=server_credentials(tls),
    )


def _use_all(verifier: RemoteKeyVerifier, plans: RemotePlanSource, usage: RemoteUsageSource) -> None:
    """One call of each admin client; raises when one fails."""
    assert verifier.verify("secret") == PRINCIPAL
    assert plans.plan_for("acme").name == "team"
    now = datetime.now(UTC)
    assert usage.used("acme", UsageKind.PREDICTIONS, now - timedelta(hours=1), now) == 3.0


async def test_admin_clients_present_renewed_certificate_files_after_a_reload(
    tmp_path: Path, certs: Path, new_ca_certs: Path
) -> None:
    # The admin service trusts only the new CA; the client's files are still from the old one.
    server = _admin_server(_tls(new_ca_certs, "admin"))
    async with server:
        address = f"localhost:{server.port}"
        live = tmp_path / "live"
        _install_client(certs, live)
        tls = _tls(live, "client")
        verifier = RemoteKeyVerifier(address, ttl_s=0, tls=tls)
        plans = RemotePlanSource(address, "service-key", ttl_s=0, tls=tls)
        usage = RemoteUsageSource(address, "service-key", tls=tls)
        try:
            with pytest.raises(UnavailableError):
                await asyncio.to_thread(_use_all, verifier, plans, usage)
            # Renewed files from the new CA: not presented before the reload ...
            _install_client(new_ca_certs, live)
            with pytest.raises(UnavailableError):
                await asyncio.to_thread(verifier.verify, "secret")
            assert reload_certificates() >= 3
            # ... and presented after it, by the same clients.
            await asyncio.to_thread(_use_all, verifier, plans, usage)
        finally:
            for client in (verifier, plans, usage):
                client.close()


async def test_calls_running_across_reloads_do_not_fail(tmp_path: Path, certs: Path) -> None:
    admin = FakeAdmin()
    server = _admin_server(_tls(certs, "admin"), admin)
    async with server:
        address = f"localhost:{server.port}"
        live = tmp_path / "live"
        _install_client(certs, live)
        # A renewal from the same CA: a new key and certificate for the client.
        renewal = tmp_path / "renewal"
        shutil.copytree(certs, renewal)
        (renewal / "client.pem").unlink()
        _certs(renewal)
        verifier = RemoteKeyVerifier(address, ttl_s=0, tls=_tls(live, "client"))
        channels: ReloadingChannel = verifier._channel
        try:
            # A call in flight on the old channel finishes there; the old channel is closed once it has.
            held = asyncio.create_task(asyncio.to_thread(verifier.verify, "hold"))
            assert await asyncio.to_thread(admin.held.wait, 10)
            _install_client(renewal, live)
            reload_certificates()
            assert channels.generation == 1
            assert channels.open_channels == 2
            assert await asyncio.to_thread(verifier.verify, "secret") == PRINCIPAL  # on the new channel
            admin.release.set()
            assert await held == PRINCIPAL
            assert channels.open_channels == 1

            # Calls one after another from several threads while the files are reloaded again and again.
            stop = threading.Event()
            errors: list[BaseException] = []
            done = [0]

            def steady() -> None:
                while not stop.is_set():
                    try:
                        assert verifier.verify("secret") == PRINCIPAL
                        done[0] += 1
                    except BaseException as exc:  # every failure counts
                        errors.append(exc)

            workers = [threading.Thread(target=steady) for _ in range(4)]
            for worker in workers:
                worker.start()
            for certificate in (certs, renewal) * 3:
                await asyncio.sleep(0.05)
                _install_client(certificate, live)
                await asyncio.to_thread(reload_certificates)
            await asyncio.sleep(0.05)
            stop.set()
            for worker in workers:
                await asyncio.to_thread(worker.join, 10)
            assert errors == []
            assert done[0] > 0
            assert channels.generation == 7
            assert channels.open_channels == 1
        finally:
            admin.release.set()
            verifier.close()
        assert channels.open_channels == 0


async def test_files_that_cannot_be_used_keep_the_running_channel(
    tmp_path: Path, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = _admin_server(_tls(certs, "admin"))
    async with server:
        address = f"localhost:{server.port}"
        live = tmp_path / "live"
        _install_client(certs, live)
        verifier = RemoteKeyVerifier(address, ttl_s=0, tls=_tls(live, "client"))
        channels: ReloadingChannel = verifier._channel
        try:
            assert await asyncio.to_thread(verifier.verify, "secret") == PRINCIPAL
            (live / "client.pem").write_text("not a certificate\n")
            with caplog.at_level(logging.INFO, logger="gristmill.core.tls"):
                reload_certificates()
            assert f"TLS certificate for calls to {address} not reloaded, keeping the running one" in caplog.text
            assert channels.generation == 0
            assert await asyncio.to_thread(verifier.verify, "secret") == PRINCIPAL
            # Fixed: the next reload takes them.
            _install_client(certs, live)
            reload_certificates()
            assert channels.generation == 1
            assert await asyncio.to_thread(verifier.verify, "secret") == PRINCIPAL
        finally:
            verifier.close()


async def test_plaintext_is_one_channel_that_a_reload_leaves_alone() -> None:
    server = _admin_server(None)
    async with server:
        channels = ReloadingChannel(f"127.0.0.1:{server.port}", TlsSettings())
        verifier = RemoteKeyVerifier(f"127.0.0.1:{server.port}", ttl_s=0)
        try:
            with channels.use() as before:
                pass
            assert channels.reload() is False
            reload_certificates()
            with channels.use() as after:
                assert after is before
            assert channels.generation == 0
            assert await asyncio.to_thread(verifier.verify, "secret") == PRINCIPAL
        finally:
            channels.close()
            verifier.close()
        channels.close()  # twice is fine
        with pytest.raises(ValueError, match="closed"), channels.use():
            pass


async def test_servings_registry_source_presents_renewed_files_after_a_reload(
    tmp_path: Path, certs: Path, new_ca_certs: Path
) -> None:
    server = _registry_server(_tls(new_ca_certs, "registry"))
    async with server:
        live = tmp_path / "live"
        _install_client(certs, live)
        source = RegistryModelSource(
            f"localhost:{server.port}",
            LocalObjectStore(tmp_path / "objects"),
            tmp_path / "cache",
            timeout_s=5,
            tls=_tls(live, "client"),
        )
        try:
            with pytest.raises(UnavailableError):
                await asyncio.to_thread(source.model_exists, "acme", "sentiment")
            _install_client(new_ca_certs, live)
            reload_certificates()
            assert await asyncio.to_thread(source.model_exists, "acme", "sentiment") is True
        finally:
            source.close()
