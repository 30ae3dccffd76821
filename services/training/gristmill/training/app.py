"""Wiring: settings -> platform (database, objects, bus) -> store, runner, domain, servicer -> ServiceHost (with the
Ray cluster and the job supervisor as its components)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from gristmill.core.auth import TRAINING_SUBMIT
from gristmill.core.base_models import RegistryBaseModels
from gristmill.core.errors import GristmillError
from gristmill.core.events.topics import DATASET_VERSION_PUBLISHED
from gristmill.core.host import Callbacks, Infrastructure, ServiceHost, Subscription, open_platform
from gristmill.core.security import Security
from gristmill.training import SERVICE_NAME, code_version
from gristmill.training.api.servicer import TrainingServicer, registration
from gristmill.training.domain.jobs import JobService
from gristmill.training.domain.publish import ModelPublisher
from gristmill.training.domain.resolve import BaseModelCatalog, DatasetCatalog, SpecResolver
from gristmill.training.domain.runs import JobRunner
from gristmill.training.domain.signal import JobSignal
from gristmill.training.domain.supervisor import JobSupervisor
from gristmill.training.events.handlers import dataset_version_published
from gristmill.training.events.payloads import TrainingEvents
from gristmill.training.ml.inspect import HfModelInspector
from gristmill.training.settings import TrainingSettings
from gristmill.training.store.sql import SqlJobStore
from gristmill.training.store.tables import TrainingBase

log = logging.getLogger(__name__)

AUTO_TRAIN_GROUP = "training-auto-train"
# Training has one scope: submitting, watching and cancelling jobs and setting auto-train policies.
METHOD_SCOPES = {"/gristmill.api.training.v1.TrainingService/*": TRAINING_SUBMIT}


class ClusterLifecycle:
    """The host component that starts the service's own Ray cluster and stops it (after the runner's actors).
    A runner handed in by the caller brings its own cluster, which is left alone (the runner's own actors are
    closed either way).

    A local cluster is started before the host's own threads (relay, consumers, gRPC server), on the event
    loop's thread: Ray starts its GCS and raylet with a ``preexec_fn``, which runs Python in the forked child
    before exec, and a fork while other threads are busy (importing, inside gRPC) can leave that child hung
    before it ever runs. Seen as a local start that timed out with no raylet log at all ("The current node timed
    out during startup", "Timed out waiting for file .../gcs_server_port"). If that first start fails, it is
    retried in the background. A cluster by address is only connected to (no process is forked): in the
    background."""

    name = "ray-cluster"

    def __init__(self, cluster: object | None, runner: object | None = None) -> None:
        self.cluster = cluster
        self.runner = runner

    async def open(self) -> None:
        cluster = self.cluster
        if cluster is None or not hasattr(cluster, "start_in_background"):
            return
        if not getattr(cluster, "address", "") and hasattr(cluster, "start"):
            try:
                cluster.start()
                return
            except GristmillError as exc:
                log.warning("%s; retrying in the background", exc.message)
        cluster.start_in_background()

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        for closer in (getattr(self.runner, "close", None), getattr(self.cluster, "stop", None)):
            if closer is not None:
                closer()


@dataclass
class TrainingApp:
    """The assembled service; ``host`` runs it, the rest is exposed for tests."""

    host: ServiceHost
    jobs: JobService
    supervisor: JobSupervisor


def build_app(
    settings: TrainingSettings,
    infra: Infrastructure,
    security: Security,
    *,
    runner: JobRunner | None = None,
    consumer_group: str = "",
) -> TrainingApp:
    """The training service on ``infra``, with ``security``'s API keys, licence and mTLS. ``runner`` defaults to
    Ray Train on the cluster of ``settings.ray_address`` (a local one when empty). ``consumer_group`` defaults
    to ``settings.auto_train_group``."""
    platform = open_platform(SERVICE_NAME, settings, infra, tables=[TrainingBase.metadata])
    data_dir = Path(settings.data_dir)
    cluster = None
    if runner is None:
        # Imported here: Ray is heavy, and tests that bring their own runner never need it.
        from gristmill.training.runner.ray_runner import CheckpointStorage, RayCluster, RayJobRunner

        cluster = RayCluster(
            address=settings.ray_address,
            num_cpus=settings.ray_num_cpus,
            num_gpus=settings.ray_num_gpus,
            log_to_driver=settings.ray_log_to_driver,
            state_dir=data_dir.resolve(),
            warm_workers=settings.ray_warm_workers,
        )
        runner = RayJobRunner(
            cluster,
            CheckpointStorage.for_object_store(infra.s3, data_dir),
            work_dir=data_dir.resolve() / "runs",
            keep_checkpoints=settings.checkpoints_to_keep,
            model_store=infra.s3 if infra.s3.endpoint else None,
        )
    store = SqlJobStore(platform.database, TrainingEvents(platform.database, platform.catalog, SERVICE_NAME))
    datasets = DatasetCatalog(platform.objects)
    registry = RegistryBaseModels(
        settings.registry_address,
        timeout_s=settings.registry_timeout_s,
        tls=security.tls,
        metadata_for=security.call_metadata,
    )
    base_models = BaseModelCatalog(
        platform.objects,
        data_dir.resolve() / "base-models",
        allow_local_paths=settings.allow_local_paths,
        registry=registry,
    )
    signal = JobSignal()
    supervisor = JobSupervisor(
        store,
        runner,
        datasets,
        base_models,
        ModelPublisher(platform.objects, code_version=code_version()),
        signal,
        max_running=settings.max_running_jobs,
        unavailable_timeout_s=settings.dependency_wait_s,
        retry_backoff_s=settings.dependency_retry_s,
        dependency_probe=lambda: platform.objects.exists("probes/reachable"),
    )
    resolver = SpecResolver(
        datasets, base_models, HfModelInspector(), runner, search_enabled=getattr(runner, "supports_search", False)
    )
    jobs = JobService(
        store,
        resolver,
        supervisor,
        signal,
        license_=security.license,
        quota=security.quota_guard(platform.database, platform.catalog, SERVICE_NAME),
    )
    subscription = Subscription(
        (DATASET_VERSION_PUBLISHED,),
        consumer_group or settings.auto_train_group,
        dataset_version_published(jobs, platform.catalog),
    )
    host = ServiceHost(
        platform,
        [registration(TrainingServicer(jobs)), security.license_registration(SERVICE_NAME)],
        settings,
        [subscription],
        auth_hook=security.auth_hook,
        on_reload=security.reload,
        server_credentials=security.server_credentials,
        # The cluster before the supervisor (which runs jobs on it), both before the host's threads.
        components=[
            ClusterLifecycle(cluster, runner),
            Callbacks("job-supervisor", on_open=supervisor.start, on_close=supervisor.stop),
            Callbacks("registry-channel", on_close=registry.close),
        ],
    )
    return TrainingApp(host, jobs, supervisor)
