"""Builders shared by the admin service's tests: the domain over SQLite, and the whole service on port 0."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from gristmill.admin.app import AdminApp, build_app
from gristmill.admin.domain.admin import Admin, LocalKeyVerifier
from gristmill.admin.domain.metering import Metering
from gristmill.admin.settings import AdminSettings
from gristmill.admin.store.sql import SqlAdminStore
from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.admin.v1 import admin_pb2_grpc as pb_grpc
from gristmill.core.auth import ADMIN, AuthSettings, Principal
from gristmill.core.events import MemoryBroker
from gristmill.core.host import Infrastructure
from gristmill.core.licensing import License
from gristmill.core.security import Security
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database
from tests.support.databases import migrated_database

ROOT = "root"
ROOT_ADMIN = Principal(ROOT, "0000000000000000", frozenset({ADMIN}))
T0 = datetime(2026, 11, 10, 12, 30, tzinfo=UTC)


class FakeClock:
    """A settable clock (thread-safe), for expiry, grace periods and quota periods."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, **delta: float) -> None:
        with self._lock:
            self.now += timedelta(**delta)


@dataclass
class Env:
    admin: Admin
    metering: Metering
    store: SqlAdminStore
    verifier: LocalKeyVerifier
    database: Database
    clock: FakeClock


def make_env(tmp_path: Path) -> Env:
    database = migrated_database(f"sqlite:///{tmp_path / 'admin.db'}", "admin")
    store = SqlAdminStore(database)
    clock = FakeClock()
    admin = Admin(store, root_organization_id=ROOT, clock=clock)
    admin.bootstrap(tmp_path / "root.key")
    return Env(admin, Metering(store, admin, clock=clock), store, LocalKeyVerifier(store, clock=clock), database, clock)


def daily_predictions_plan(limit: float, name: str = "tiny") -> pb.Plan:
    """A plan whose one quota is ``limit`` predictions a day (the metered tests' plan)."""
    quota = pb.Quota(kind=pb.USAGE_KIND_PREDICTIONS, period=pb.QUOTA_PERIOD_DAY, limit=limit)
    return pb.Plan(name=name, quotas=[quota])


def bearer(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


@dataclass
class RunningAdmin:
    app: AdminApp
    address: str
    root_secret: str
    channel: grpc.aio.Channel

    @property
    def admin(self) -> pb_grpc.AdminServiceStub:
        return pb_grpc.AdminServiceStub(self.channel)

    @property
    def metering(self) -> pb_grpc.MeteringServiceStub:
        return pb_grpc.MeteringServiceStub(self.channel)

    async def create_org(self, org: str, plan: pb.Plan | None = None) -> pb.Organization:
        request = pb.CreateOrganizationRequest(organization_id=org, display_name=org.title())
        if plan is not None:
            request.plan.CopyFrom(plan)
        reply: pb.Organization = await self.admin.CreateOrganization(request, metadata=bearer(self.root_secret))
        return reply

    async def create_key(self, org: str, *scopes: str) -> str:
        reply = await self.admin.CreateApiKey(
            pb.CreateApiKeyRequest(organization_id=org, display_name="test", scopes=list(scopes)),
            metadata=bearer(self.root_secret),
        )
        secret: str = reply.secret
        return secret


@asynccontextmanager
async def running_admin(
    tmp_path: Path,
    *,
    kafka: KafkaSettings | None = None,
    metering_group: str = "admin-metering",
    tracer_provider: Any = None,
    clock: Any = None,
    license_: License | None = None,
) -> AsyncIterator[RunningAdmin]:
    """The admin service on an ephemeral port (in-process bus unless ``kafka``), bootstrapped."""
    settings = AdminSettings(
        data_dir=tmp_path / "admin", grpc_port=0, root_organization_id=ROOT, metering_group=metering_group
    )
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    infra = (
        Infrastructure(kafka=kafka, tracer_provider=tracer_provider)
        if kafka
        else Infrastructure(memory_broker=MemoryBroker(), tracer_provider=tracer_provider)
    )
    security = Security(None, license_ or License(), auth=AuthSettings(disabled=False, admin_address=""))
    app = build_app(settings, infra, security, bootstrap=False, **extra)
    key_file = app.bootstrap()
    assert key_file is not None
    root_secret = key_file.read_text().strip()
    port = await app.host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield RunningAdmin(app, f"127.0.0.1:{port}", root_secret, channel)
    finally:
        await app.host.stop()
