"""A version of a deployment while it is in memory: its runtime, batcher and counters, and the views of
deployments and versions that the API reports. ``DeploymentManager`` (deployments.py) owns their lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from gristmill.serving.domain.batcher import BatchPolicy, DynamicBatcher
from gristmill.serving.domain.drift import DriftWindow
from gristmill.serving.domain.generation import GenerativeModel
from gristmill.serving.domain.model import BatchingConfig, DeploymentSpec
from gristmill.serving.domain.sources import Classifier, Encoded, LoadOptions, ResolvedVersion
from gristmill.serving.domain.stats import Observer, VersionStats


class VersionState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class DeploymentState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"


def batch_policy(config: BatchingConfig) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=config.max_batch_size,
        max_delay_s=config.max_delay_ms / 1000.0,
        max_queue_size=config.max_queue_size,
    )


class LoadedVersion:
    """One version of a deployment's model: loading, serving, draining or failed."""

    def __init__(
        self, deployment: str, resolved: ResolvedVersion, options: LoadOptions, observer: Observer | None
    ) -> None:
        self.deployment = deployment
        self.resolved = resolved
        self.options = options
        self.state = VersionState.LOADING
        self.classifier: Classifier | None = None
        # A causal LM (chat versions) instead of a classifier: it has its own continuous batcher.
        self.generator: GenerativeModel | None = None
        self.batcher: DynamicBatcher[Encoded, Sequence[float]] | None = None
        self.stats = VersionStats(deployment, resolved.version, observer)
        # Drift of its predictions against its test split (classifiers published with a profile; else None).
        self.drift: DriftWindow | None = None
        self.error = ""
        self.ready_time: datetime | None = None
        self.memory_bytes = 0
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def version(self) -> int:
        return self.resolved.version

    @property
    def labels(self) -> tuple[str, ...]:
        if self.resolved.label_map:
            return self.resolved.label_map
        return tuple(self.classifier.labels) if self.classifier is not None else ()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def free(self) -> None:
        """Stop the batcher and free the model (after draining)."""
        if self.batcher is not None:
            await self.batcher.close()
        classifier, self.classifier = self.classifier, None
        if classifier is not None:
            await asyncio.to_thread(classifier.close)
        generator, self.generator = self.generator, None
        if generator is not None:
            await asyncio.to_thread(generator.close)


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: VersionState
    traffic_weight: float
    error: str
    ready_time: datetime | None
    request_count: int
    error_count: int
    latency_p50_ms: float
    latency_p99_ms: float
    memory_bytes: int


@dataclass(frozen=True)
class DeploymentView:
    spec: DeploymentSpec
    state: DeploymentState
    message: str
    versions: tuple[VersionStatus, ...]


def version_status(version: LoadedVersion, weight: float) -> VersionStatus:
    p50, p99 = version.stats.latency_ms()
    return VersionStatus(
        version=version.version,
        state=version.state,
        traffic_weight=weight,
        error=version.error,
        ready_time=version.ready_time,
        request_count=version.stats.request_count,
        error_count=version.stats.error_count,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        memory_bytes=version.memory_bytes,
    )
