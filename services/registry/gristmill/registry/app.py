"""Wiring: settings → platform (database, objects, bus, tracing) → store, domain, servicer, consumers → host."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth import REGISTRY_PROMOTE, REGISTRY_READ
from gristmill.core.host import Infrastructure, PeriodicTask, ServiceHost, Subscription, open_platform
from gristmill.core.security import Security
from gristmill.core.values import utc_now
from gristmill.registry import SERVICE_NAME
from gristmill.registry.api.servicer import RegistryServicer, registration
from gristmill.registry.domain.registration import Registrations
from gristmill.registry.domain.services import RegistryServices
from gristmill.registry.events.handlers import feedback_handler, job_state_changed_handler, version_registered_handler
from gristmill.registry.events.payloads import OutboxEventWriter
from gristmill.registry.settings import RegistrySettings
from gristmill.registry.store.sql import SqlRegistryStore
from gristmill.registry.store.tables import REGISTRY_TABLES

log = logging.getLogger(__name__)

_REGISTRY = "/gristmill.api.registry.v1.RegistryService"
# Reads need registry:read; every change (models, versions, aliases, policies, cards, base models) needs
# registry:promote, the scope of people who decide what is served.
METHOD_SCOPES = {
    f"{_REGISTRY}/*": REGISTRY_PROMOTE,
    **{
        f"{_REGISTRY}/{method}": REGISTRY_READ
        for method in (
            "GetRegisteredModel",
            "SearchRegisteredModels",
            "GetModelVersion",
            "ListModelVersions",
            "GetAliasHistory",
            "GetPromotionPolicy",
            "ListPendingPromotions",
            "GetModelCard",
            "ListBaseModels",
            "GetBaseModel",
            "GetDownloadManifest",
        )
    },
}


@dataclass
class RegistryApp:
    """The assembled service; ``host`` runs it, the rest is exposed for ``__main__`` and tests."""

    host: ServiceHost
    registry: RegistryServices
    store: SqlRegistryStore
    servicer: RegistryServicer


def build_app(
    settings: RegistrySettings,
    infra: Infrastructure,
    security: Security,
    *,
    clock: Callable[[], datetime] = utc_now,
) -> RegistryApp:
    """The registry on ``infra``, with ``security``'s API keys, licence and mTLS; its host also finishes the
    verifications a previous run left PENDING."""
    platform = open_platform(SERVICE_NAME, settings, infra, tables=[REGISTRY_TABLES])
    store = SqlRegistryStore(platform.database, OutboxEventWriter(platform.catalog, SERVICE_NAME))
    registry = RegistryServices.create(
        store,
        platform.objects,
        clock=clock,
        allow_local_paths=settings.allow_local_paths,
        license_=security.license,
    )
    service, servicer = registration(registry)
    catalog = platform.catalog
    subscriptions = [
        Subscription(
            (catalog.topic_for(events_pb2.JobStateChanged),),
            settings.job_events_group,
            job_state_changed_handler(registry.registrations, store, catalog),
        ),
        Subscription(
            (catalog.topic_for(events_pb2.ModelVersionRegistered),),
            settings.promotion_group,
            version_registered_handler(registry.promotions, store, catalog),
        ),
        Subscription(
            (catalog.topic_for(events_pb2.FeedbackRecorded), catalog.topic_for(events_pb2.GenerationOutcomes)),
            settings.online_gate_group,
            feedback_handler(registry.promotions, store, catalog),
        ),
    ]
    host = ServiceHost(
        platform,
        [service, security.license_registration(SERVICE_NAME)],
        settings,
        subscriptions,
        auth_hook=security.auth_hook,
        on_reload=security.reload,
        server_credentials=security.server_credentials,
        tasks=[
            PeriodicTask(
                "retry-verifications",
                resume_pending_verifications(registry.registrations, settings.verification_stale_s),
                settings.verification_retry_s,
            )
        ],
    )
    return RegistryApp(host=host, registry=registry, store=store, servicer=servicer)


def resume_pending_verifications(registrations: Registrations, stale_s: float) -> Callable[[bool], None]:
    """Finish versions left PENDING: every one at start (the last run's), then those older than ``stale_s``.

    A host task, so that a large copy never delays serving; an interrupted one stays PENDING.
    """

    def resume(first: bool) -> None:
        finished = registrations.resume_pending(min_age_s=0.0 if first else stale_s)
        if finished:
            log.info("finished the verification of %d PENDING version(s)", finished)

    return resume
