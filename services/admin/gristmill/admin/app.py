"""Wiring: settings → platform (database, bus, tracing) → store, domain, servicers, aggregator → host."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider

from gristmill.admin import SERVICE_NAME
from gristmill.admin.api.servicer import METHOD_SCOPES, registrations
from gristmill.admin.domain.admin import Admin, LocalKeyVerifier, utc_now
from gristmill.admin.domain.metering import Metering
from gristmill.admin.events.handlers import usage_recorded_handler
from gristmill.admin.settings import AdminSettings
from gristmill.admin.store.sql import SqlAdminStore
from gristmill.admin.store.tables import ADMIN_TABLES
from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth import AuthSettings
from gristmill.core.events import MemoryBroker
from gristmill.core.host import ServiceHost, Subscription, open_platform
from gristmill.core.license_service import license_registration
from gristmill.core.licensing import License
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings


@dataclass
class AdminApp:
    """The assembled service; ``host`` runs it, the rest is exposed for ``__main__`` and tests."""

    host: ServiceHost
    admin: Admin
    metering: Metering
    store: SqlAdminStore
    verifier: LocalKeyVerifier
    settings: AdminSettings

    def bootstrap(self) -> Path | None:
        """First start: the root organisation and its first admin key (written to the bootstrap key file)."""
        return self.admin.bootstrap(self.settings.resolved_bootstrap_key_file())


def build_app(
    settings: AdminSettings,
    *,
    kafka: KafkaSettings,
    auth: AuthSettings,
    license_: License,
    telemetry: TelemetrySettings | None = None,
    memory_broker: MemoryBroker | None = None,
    tracer_provider: TracerProvider | None = None,
    server_credentials: grpc.ServerCredentials | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> AdminApp:
    platform = open_platform(
        SERVICE_NAME,
        settings,
        kafka=kafka,
        # The admin service keeps no objects: the local store under its data dir is never written.
        s3=S3Settings(endpoint=""),
        telemetry=telemetry,
        tables=[ADMIN_TABLES],
        memory_broker=memory_broker,
        tracer_provider=tracer_provider,
    )
    store = SqlAdminStore(platform.database)
    admin = Admin(store, root_organization_id=settings.root_organization_id, clock=clock)
    metering = Metering(store, admin, clock=clock)
    verifier = LocalKeyVerifier(store, clock=clock)
    auth_hook = build_auth_hook(
        auth,
        method_scopes=METHOD_SCOPES,
        embedded=not kafka.bootstrap_servers,
        verifier=verifier,
        service=SERVICE_NAME,
    )
    catalog = platform.catalog
    subscriptions = [
        Subscription(
            (catalog.topic_for(events_pb2.UsageRecorded),),
            settings.metering_group,
            usage_recorded_handler(metering, catalog),
        )
    ]
    host = ServiceHost(
        platform,
        [*registrations(admin, metering), license_registration(license_, SERVICE_NAME)],
        settings,
        subscriptions,
        auth_hook=auth_hook,
        server_credentials=server_credentials,
    )
    return AdminApp(host, admin, metering, store, verifier, settings)


def build_host(
    settings: AdminSettings,
    *,
    kafka: KafkaSettings,
    s3: S3Settings,
    security: Security,
    telemetry: TelemetrySettings | None = None,
) -> ServiceHost:
    """The admin service as ``run_service`` runs it (``security`` from ``load_security(local_keys=True)``): the
    first-start bootstrap done (root organisation, first admin key), SIGHUP adopting a renewed licence file (a
    bad one keeps the running licence). The admin service keeps no objects: ``s3`` is not used."""
    if security.auth is None:
        raise ValueError("the admin service needs the auth settings: load_security(..., local_keys=True)")
    app = build_app(
        settings,
        kafka=kafka,
        auth=security.auth,
        license_=security.license,
        telemetry=telemetry,
        server_credentials=security.server_credentials,
    )
    app.bootstrap()
    app.host.on_reload = security.reload
    return app.host
