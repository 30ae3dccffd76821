"""Wiring: settings → platform (database, bus, tracing) → store, domain, servicers, aggregator → host."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from gristmill.admin import SERVICE_NAME
from gristmill.admin.api.servicer import METHOD_SCOPES, registrations
from gristmill.admin.domain.admin import Admin, LocalKeyVerifier
from gristmill.admin.domain.metering import Metering
from gristmill.admin.events.handlers import usage_recorded_handler
from gristmill.admin.settings import AdminSettings
from gristmill.admin.store.sql import SqlAdminStore
from gristmill.admin.store.tables import ADMIN_TABLES
from gristmill.api.events.v1 import events_pb2
from gristmill.core.host import Infrastructure, ServiceHost, Subscription, open_platform
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.settings import S3Settings
from gristmill.core.values import utc_now


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
    infra: Infrastructure,
    security: Security,
    *,
    clock: Callable[[], datetime] = utc_now,
    bootstrap: bool = True,
) -> AdminApp:
    """The admin service on ``infra``. It checks API keys itself, against its own store, with the hook it builds
    from ``security.auth`` (``load_security(..., local_keys=True)``); SIGHUP adopts a renewed licence file (a bad
    one keeps the running licence). ``bootstrap``: the first-start bootstrap done (root organisation, first
    admin key), as ``python -m`` and the embedded platform run it; tests may call ``AdminApp.bootstrap`` for
    the key file. The admin service keeps no objects: ``infra.s3`` is not used."""
    if security.auth is None:
        raise ValueError("the admin service needs the auth settings: load_security(..., local_keys=True)")
    # The local store under its data dir is never written.
    platform = open_platform(SERVICE_NAME, settings, replace(infra, s3=S3Settings(endpoint="")), tables=[ADMIN_TABLES])
    store = SqlAdminStore(platform.database)
    admin = Admin(store, root_organization_id=settings.root_organization_id, clock=clock)
    metering = Metering(store, admin, clock=clock)
    verifier = LocalKeyVerifier(store, clock=clock)
    auth_hook = build_auth_hook(
        security.auth,
        method_scopes=METHOD_SCOPES,
        embedded=infra.embedded,
        verifier=verifier,
        service=SERVICE_NAME,
    )
    catalog = platform.catalog
    subscriptions = [
        # A batch handler: each fetched batch of usage events is one transaction and one upsert per hourly total.
        Subscription(
            (catalog.topic_for(events_pb2.UsageRecorded),),
            settings.metering_group,
            usage_recorded_handler(metering, catalog),
        )
    ]
    host = ServiceHost(
        platform,
        [*registrations(admin, metering), security.license_registration(SERVICE_NAME)],
        settings,
        subscriptions,
        auth_hook=auth_hook,
        on_reload=security.reload,
        server_credentials=security.server_credentials,
    )
    app = AdminApp(host, admin, metering, store, verifier, settings)
    if bootstrap:
        app.bootstrap()
    return app
