"""Wiring: settings → platform (database, objects, bus, tracing) → store, service, servicer, consumers → host."""

from __future__ import annotations

from dataclasses import dataclass

from gristmill.api.labeling.v1 import labeling_pb2, labeling_pb2_grpc
from gristmill.core.auth import LABELING_READ, LABELING_WRITE
from gristmill.core.events.topics import LABELING_FEEDBACK, PREDICTION_LOGGED
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.host import Callbacks, Infrastructure, ServiceHost, Subscription, open_platform
from gristmill.core.security import Security
from gristmill.labeling.api.servicer import LabelingServicer
from gristmill.labeling.domain.importer import IndexCache
from gristmill.labeling.domain.service import Clock, LabelingService, utc_now
from gristmill.labeling.domain.tokens import TokenizerSource
from gristmill.labeling.events.feedback import FeedbackHandler
from gristmill.labeling.events.payloads import LabelingEvents
from gristmill.labeling.events.predictions import PredictionLogHandler
from gristmill.labeling.settings import LabelingSettings
from gristmill.labeling.store import tables
from gristmill.labeling.store.sql import SqlLabelingStore

SERVICE = "labeling"

_LABELING = "/gristmill.api.labeling.v1.LabelingService"
# The scope of each RPC: reads need labeling:read, everything that changes data labeling:write.
METHOD_SCOPES = {
    f"{_LABELING}/*": LABELING_WRITE,
    **{
        f"{_LABELING}/{method}": LABELING_READ
        for method in (
            "GetProject",
            "ListProjects",
            "GetLabelSchema",
            "ListLabelSchemas",
            "GetImport",
            "ListImports",
            "GetItem",
            "ListItems",
            "GetAgreement",
            "GetDatasetVersion",
            "ListDatasetVersions",
            "ExportDataset",
        )
    },
}


@dataclass
class LabelingApp:
    """The assembled service; ``host`` runs it, the rest is exposed for tests."""

    host: ServiceHost
    service: LabelingService
    store: SqlLabelingStore


def build_app(
    settings: LabelingSettings,
    infra: Infrastructure,
    security: Security,
    *,
    clock: Clock = utc_now,
    tokenizers: TokenizerSource | None = None,
) -> LabelingApp:
    """The labeling service on ``infra``, ready to ``host.start()`` (or ``host.run_until_signal()``), with
    ``security``'s API keys, licence and mTLS.

    ``tokenizers`` defaults to base models' tokenizers from the registry at ``settings.registry_address`` (files
    from the object store, called with this service's key and mTLS); tests may pass a local source.
    """
    platform = open_platform(SERVICE, settings, infra, tables=[tables.metadata])
    store = SqlLabelingStore(platform.database, events=LabelingEvents(platform.catalog))
    if tokenizers is None:
        from gristmill.labeling.runtime.tokenizers import RegistryTokenizerSource

        tokenizers = RegistryTokenizerSource(
            settings.registry_address,
            platform.objects,
            settings.resolved_tokenizer_cache_dir(),
            timeout_s=settings.registry_timeout_s,
            capacity=settings.tokenizer_cache_size,
            tls=security.tls,
            metadata_for=security.call_metadata,
        )
    service = LabelingService(
        store,
        platform.objects,
        clock=clock,
        index_cache=IndexCache(settings.index_cache_projects),
        tokenizers=tokenizers,
    )
    servicer = LabelingServicer(service)
    registration = ServiceRegistration(
        labeling_pb2.DESCRIPTOR.services_by_name["LabelingService"],
        lambda server: labeling_pb2_grpc.add_LabelingServiceServicer_to_server(servicer, server),
    )
    consumer = Subscription(
        (PREDICTION_LOGGED,),
        settings.active_learning_group,
        PredictionLogHandler(service, store, platform.catalog),
    )
    feedback = Subscription(
        LABELING_FEEDBACK.topics, settings.feedback_group, FeedbackHandler(service, store, platform.catalog)
    )
    host = ServiceHost(
        platform,
        [registration, security.license_registration(SERVICE)],
        settings,
        [consumer, feedback],
        auth_hook=security.auth_hook,
        on_reload=security.reload,
        server_credentials=security.server_credentials,
        # Closed once the server has drained (no import still counts tokens).
        components=[Callbacks("tokenizers", on_close=tokenizers.close)],
    )
    return LabelingApp(host, service, store)
