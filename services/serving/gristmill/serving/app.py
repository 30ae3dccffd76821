"""Wiring: settings → platform → store, model source, deployments, servicers, consumer → ``ServingHost``."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Sequence

import grpc
from opentelemetry.sdk.trace import TracerProvider

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from gristmill.core.auth import ADMIN, SERVING_PREDICT
from gristmill.core.events import MemoryBroker
from gristmill.core.events.topics import ALIAS_CHANGED
from gristmill.core.grpcserver import AuthHook, ServiceRegistration, serve_until_signal
from gristmill.core.host import Platform, ServiceHost, Subscription, open_platform
from gristmill.core.security import Security
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings
from gristmill.serving.api.inference import InferenceServicer
from gristmill.serving.api.servicer import ServingServicer
from gristmill.serving.domain.deployments import DeploymentManager
from gristmill.serving.domain.service import DeploymentService
from gristmill.serving.domain.sources import ModelLoader, ModelSource
from gristmill.serving.events.handlers import alias_changed_handler
from gristmill.serving.events.prediction_log import OutboxPredictionSink
from gristmill.serving.metrics import ServingMetrics
from gristmill.serving.settings import ServingSettings
from gristmill.serving.store.sql import TABLES, SqlDeploymentStore

log = logging.getLogger(__name__)

SERVICE = "serving"

_SERVING = "/gristmill.api.serving.v1.ServingService"
_OIP = "/inference.GRPCInferenceService"
# Predictions and reading deployments need serving:predict; changing what is served needs admin.
# ServerLive/ServerReady stay open, like health, for load balancers and probes that carry no key.
METHOD_SCOPES = {
    f"{_SERVING}/*": SERVING_PREDICT,
    f"{_OIP}/*": SERVING_PREDICT,
    **{f"{_SERVING}/{method}": ADMIN for method in ("CreateDeployment", "UpdateDeployment", "DeleteDeployment")},
}
PUBLIC_METHODS = (f"{_OIP}/ServerLive", f"{_OIP}/ServerReady")


class ServingHost(ServiceHost):
    """A ``ServiceHost`` that also restores deployments at start and frees models and the prediction log at stop.

    Stop order: drain in-flight calls (gRPC) → free models → flush the prediction log → consumers, outbox,
    bus, database (the base host).
    """

    def __init__(
        self,
        platform: Platform,
        registrations: Sequence[ServiceRegistration],
        settings: ServingSettings,
        subscriptions: Sequence[Subscription],
        *,
        service: DeploymentService,
        sink: OutboxPredictionSink,
        source: ModelSource,
        auth_hook: AuthHook | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        on_reload: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(
            platform,
            registrations,
            settings,
            subscriptions,
            auth_hook=auth_hook,
            server_credentials=server_credentials,
            on_reload=on_reload,
        )
        self.service = service
        self.sink = sink
        self.source = source
        self._serving_closed = False

    async def start(self) -> int:
        # Before the consumer starts: alias events need the deployments and the event loop.
        await self.service.start()
        return await super().start()

    async def _close_serving(self) -> None:
        if self._serving_closed:
            return
        self._serving_closed = True
        await self.service.close()
        await asyncio.to_thread(self.sink.close)
        self.source.close()

    async def stop(self) -> None:
        if not self._stopped and self._server is not None:
            await self._server.stop()
        await self._close_serving()
        await super().stop()

    async def run_until_signal(self) -> None:
        await self.service.start()
        self._open_background_work()
        with self.reload_on_sighup():
            await serve_until_signal(
                self.server,
                # Run in reverse: free models and flush the log first, then the base host's background work.
                on_stop=[lambda: asyncio.to_thread(self._close_background_work), self._close_serving],
            )
        self._stopped = True


def build_host(
    settings: ServingSettings,
    *,
    kafka: KafkaSettings,
    s3: S3Settings,
    security: Security,
    telemetry: TelemetrySettings | None = None,
    source: ModelSource | None = None,
    loader: ModelLoader | None = None,
    memory_broker: MemoryBroker | None = None,
    tracer_provider: TracerProvider | None = None,
    rng: random.Random | None = None,
) -> ServingHost:
    """The serving service on the platform ``settings``/``kafka``/``s3`` describe.

    ``source`` defaults to the registry at ``settings.registry_address`` (files from the object store);
    ``loader`` to the transformers classifier. Tests pass a local source, a fake loader, a shared in-process
    broker, an in-memory tracer or a seeded ``rng`` (canary split and log sampling).
    """
    platform = open_platform(
        SERVICE,
        settings,
        kafka=kafka,
        s3=s3,
        telemetry=telemetry,
        tables=[TABLES],
        memory_broker=memory_broker,
        tracer_provider=tracer_provider,
    )
    store = SqlDeploymentStore(platform.database)
    if source is None:
        from gristmill.serving.runtime.sources import RegistryModelSource

        source = RegistryModelSource(
            settings.registry_address,
            platform.objects,
            settings.resolved_model_cache_dir(),
            timeout_s=settings.registry_timeout_s,
            credentials=security.channel_credentials,
            metadata_for=security.call_metadata,
        )
    if loader is None:
        # Imported only here: torch and transformers take seconds and hundreds of MB to import.
        from gristmill.serving.runtime.classifier import load_transformers_classifier

        loader = functools.partial(load_transformers_classifier, trace=settings.trace_models)
    metrics = ServingMetrics(platform.metrics)
    manager = DeploymentManager(
        source,
        loader,
        observer=metrics.observe,
        on_queue_depth=metrics.queue_depth,
        rng=rng,
        batch_workers=settings.resolved_batch_workers(),
    )
    sink = OutboxPredictionSink(
        platform.database,
        platform.catalog,
        source=SERVICE,
        capacity=settings.prediction_log_capacity,
        metrics=platform.metrics,
    )
    service = DeploymentService(
        store,
        manager,
        source,
        sink=sink,
        rng=rng,
        license_=security.license,
        quota=security.quota_guard(platform.database, platform.catalog, SERVICE),
    )
    serving = ServingServicer(service)
    inference = InferenceServicer(service)
    registrations = [
        ServiceRegistration(
            serving_pb2.DESCRIPTOR.services_by_name["ServingService"],
            lambda server: serving_pb2_grpc.add_ServingServiceServicer_to_server(serving, server),
        ),
        ServiceRegistration(
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            lambda server: oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server),
        ),
    ]
    subscriptions = [
        Subscription((ALIAS_CHANGED,), settings.consumer_group, alias_changed_handler(platform.catalog, store, service))
    ]
    return ServingHost(
        platform,
        [*registrations, security.license_registration(SERVICE)],
        settings,
        subscriptions,
        service=service,
        sink=sink,
        source=source,
        auth_hook=security.auth_hook,
        on_reload=security.reload,
        server_credentials=security.server_credentials,
    )
