"""Wiring: settings → platform → store, model source, deployments, servicers, consumer → ``ServiceHost``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from gristmill.core.auth import ADMIN, SERVING_PREDICT
from gristmill.core.events.topics import ALIAS_CHANGED
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.host import Infrastructure, PeriodicTask, ServiceHost, Subscription, open_platform
from gristmill.core.security import Security, quota_refresh
from gristmill.serving.api.inference import InferenceServicer
from gristmill.serving.api.openai_http import OPENAI_SCOPES, OpenAIServer, openai_app
from gristmill.serving.api.servicer import ServingServicer
from gristmill.serving.domain.deployments import DeploymentManager
from gristmill.serving.domain.service import DeploymentService
from gristmill.serving.domain.sources import ModelLoader, ModelSource
from gristmill.serving.events.feedback import OutboxFeedbackPublisher
from gristmill.serving.events.handlers import alias_changed_handler
from gristmill.serving.events.prediction_log import OutboxPredictionSink
from gristmill.serving.metrics import ServingMetrics
from gristmill.serving.settings import ServingSettings
from gristmill.serving.store.sql import SqlDeploymentStore
from gristmill.serving.store.tables import TABLES
from gristmill.serving.tasks import TaskRuntimeLoader

log = logging.getLogger(__name__)

SERVICE = "serving"

_SERVING = "/gristmill.api.serving.v1.ServingService"
_OIP = "/inference.GRPCInferenceService"
# Predictions and reading deployments need serving:predict; changing what is served needs admin.
# ServerLive/ServerReady stay open, like health, for load balancers and probes that carry no key. The
# OpenAI-compatible HTTP API's routes are checked by the same hook, named like RPCs (OPENAI_SCOPES).
METHOD_SCOPES = {
    f"{_SERVING}/*": SERVING_PREDICT,
    f"{_OIP}/*": SERVING_PREDICT,
    **OPENAI_SCOPES,
    **{f"{_SERVING}/{method}": ADMIN for method in ("CreateDeployment", "UpdateDeployment", "DeleteDeployment")},
}
PUBLIC_METHODS = (f"{_OIP}/ServerLive", f"{_OIP}/ServerReady")


@dataclass
class ServingApp:
    """The assembled service; ``host`` runs it (``deployments`` and ``deployment-sync`` among its components), the
    rest is exposed for tests and benchmarks."""

    host: ServiceHost
    service: DeploymentService
    sink: OutboxPredictionSink
    source: ModelSource
    # The OpenAI-compatible HTTP API (its ``port`` is the bound one once the host started); None when off.
    openai: OpenAIServer | None = None


@dataclass
class DeploymentsLifecycle:
    """The host component of the deployments: opened before the consumers (alias events need the deployments
    and the event loop), closed once the server has drained: models freed, the prediction log flushed (into
    the outbox, which the host flushes after this), the model source closed."""

    service: DeploymentService
    sink: OutboxPredictionSink
    source: ModelSource
    name: str = "deployments"

    async def open(self) -> None:
        await self.service.start()

    async def close(self) -> None:
        await self.service.close()
        await asyncio.to_thread(self.sink.close)
        self.source.close()


@dataclass
class DeploymentSync:
    """The host component that runs ``DeploymentService.sync`` every ``interval_s`` on the event loop (where the
    deployments live), so that replicas sharing the deployment store serve the same deployments. Opened after
    the deployments, closed before them; a failed sync (the database away) is logged and tried again."""

    service: DeploymentService
    interval_s: float
    name: str = "deployment-sync"
    _task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.service.sync()
            except Exception:
                log.exception("deployment sync failed; trying again in %.1fs", self.interval_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def build_app(
    settings: ServingSettings,
    infra: Infrastructure,
    security: Security,
    *,
    source: ModelSource | None = None,
    loader: ModelLoader | None = None,
    rng: random.Random | None = None,
) -> ServingApp:
    """The serving service on ``infra``, with ``security``'s API keys, licence and mTLS.

    ``source`` defaults to the registry at ``settings.registry_address`` (files from the object store);
    ``loader`` to the transformers classifier. Tests pass a local source, a fake loader, a seeded ``rng``
    (canary split and log sampling), and a shared in-process broker or an in-memory tracer in ``infra``.
    """
    platform = open_platform(SERVICE, settings, infra, tables=[TABLES])
    store = SqlDeploymentStore(platform.database)
    if source is None:
        from gristmill.serving.runtime.sources import RegistryModelSource

        source = RegistryModelSource(
            settings.registry_address,
            platform.objects,
            settings.resolved_model_cache_dir(),
            timeout_s=settings.registry_timeout_s,
            tls=security.tls,
            metadata_for=security.call_metadata,
        )
    if loader is None:
        # Each version is loaded by the runtime of its task type; torch and transformers (seconds and hundreds
        # of MB to import) are imported here, not at module import.
        loader = TaskRuntimeLoader(trace=settings.trace_models, generation_limits=settings.generation_limits())
    metrics = ServingMetrics(platform.metrics)
    manager = DeploymentManager(
        source,
        loader,
        observer=metrics.observe,
        drift_observer=metrics.drift,
        on_queue_depth=metrics.queue_depth,
        rng=rng,
        batch_workers=settings.resolved_batch_workers(),
        light_load_every_core=settings.light_load_every_core,
    )
    sink = OutboxPredictionSink(
        platform.database,
        platform.catalog,
        source=SERVICE,
        capacity=settings.prediction_log_capacity,
        metrics=platform.metrics,
    )
    quota = security.quota_guard(platform.database, platform.catalog, SERVICE)
    publisher = OutboxFeedbackPublisher(platform.database, platform.catalog, source=SERVICE)
    service = DeploymentService(
        store,
        manager,
        source,
        sink=sink,
        rng=rng,
        license_=security.license,
        quota=quota,
        feedback=publisher,
        outcomes=publisher,
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
    openai_port = settings.resolved_openai_port()
    openai = (
        None
        if openai_port is None
        else OpenAIServer(
            openai_app(service, security, tracer_provider=platform.tracer_provider),
            host=settings.host,
            port=openai_port,
            grace_s=settings.shutdown_grace_s,
            tls=security.tls,
        )
    )
    subscriptions = [
        Subscription(
            (ALIAS_CHANGED,),
            settings.resolved_consumer_group(),
            alias_changed_handler(platform.catalog, store, service),
        )
    ]
    host = ServiceHost(
        platform,
        [*registrations, security.license_registration(SERVICE)],
        settings,
        subscriptions,
        auth_hook=security.auth_hook,
        on_reload=security.reload,
        server_credentials=security.server_credentials,
        components=[
            DeploymentsLifecycle(service, sink, source),
            DeploymentSync(service, settings.deployment_sync_s),
            *([quota_refresh(quota)] if quota else []),
            # Last of the service's own: it takes requests once the deployments and the quotas are up, and stops
            # taking them (its replies drained) before they close.
            *([openai] if openai else []),
        ],
        tasks=[PeriodicTask("generation-outcomes", service.flush_outcomes, settings.outcomes_flush_s)],
    )
    return ServingApp(host, service, sink, source, openai)
