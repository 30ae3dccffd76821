"""What every service process is made of, wired once: the platform it runs on and its lifecycle.

``open_platform`` turns settings into the shared infrastructure (database, object store, event bus,
tracer, metrics): Kafka when ``GRISTMILL_KAFKA_BOOTSTRAP_SERVERS`` is set, else the in-process bus;
S3 when ``GRISTMILL_S3_ENDPOINT`` is set, else a directory under the data dir.

``ServiceHost`` runs one service on it: the outbox relay, the event consumers, the service's own background
tasks (``PeriodicTask``) and the gRPC server, started in that order and stopped in reverse (health
NOT_SERVING → drain in-flight calls → stop tasks and consumers → flush the outbox one last time → close the
bus → close the database). A service's
``app.py`` builds one; its ``__main__`` calls ``run_until_signal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import MetaData

from gristmill.core.errors import GristmillError
from gristmill.core.events import Consumer, EventBus, EventCatalog, Handler, MemoryBroker, MemoryEventBus, OutboxRelay
from gristmill.core.events.topics import platform_catalog
from gristmill.core.grpcserver import AuthHook, GrpcServer, ServiceRegistration, serve_until_signal
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.settings import KafkaSettings, S3Settings, ServiceSettings, TelemetrySettings
from gristmill.core.sql import Database
from gristmill.core.storage import ObjectStore, open_object_store
from gristmill.core.telemetry import setup_tracing

log = logging.getLogger(__name__)

# gRPC health names of the background parts: a stalled consumer is NOT_SERVING here while the service's RPCs
# (and its overall health) keep working.
CONSUMER_HEALTH_PREFIX = "gristmill.consumer."


@dataclass
class Platform:
    """The infrastructure one service runs on. Build with ``open_platform``; tests may build it by hand."""

    service: str
    database: Database
    objects: ObjectStore
    bus: EventBus
    catalog: EventCatalog
    tracer_provider: TracerProvider
    metrics: ServiceMetrics

    def close(self) -> None:
        self.bus.close()
        self.database.dispose()


def open_platform(
    service: str,
    settings: ServiceSettings,
    *,
    kafka: KafkaSettings,
    s3: S3Settings,
    telemetry: TelemetrySettings | None = None,
    tables: Sequence[MetaData] = (),
    memory_broker: MemoryBroker | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Platform:
    """Open the database (creating ``tables``), object store, bus, tracer and metrics for ``service``.

    ``memory_broker`` lets several services in one process (embedded mode, tests) share the in-process bus.
    """
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    metrics = ServiceMetrics(service)
    provider = tracer_provider or setup_tracing(service, telemetry)
    database = Database(settings.resolved_database_url(service))
    database.create_all(*tables)
    bus: EventBus
    if kafka.bootstrap_servers:
        from gristmill.core.events.kafka import KafkaEventBus

        bus = KafkaEventBus(kafka, database=database, tracer_provider=provider, metrics=metrics)
    else:
        bus = MemoryEventBus(memory_broker, database=database, tracer_provider=provider, metrics=metrics)
    objects = open_object_store(s3, Path(settings.data_dir))
    return Platform(service, database, objects, bus, platform_catalog(), provider, metrics)


class PeriodicTask:
    """A service's own background work (finishing what an earlier run left half-done, sweeping), run by the
    host in every mode (networked, embedded, tests) on a daemon thread: ``work`` at start (its argument is
    ``True`` then), then every ``interval_s``. An exception is logged and retried at the next interval; the
    thread ends with the host. ``work`` must be safe to interrupt: a stop does not wait for it to finish."""

    def __init__(self, name: str, work: Callable[[bool], object], interval_s: float) -> None:
        self.name = name
        self.work = work
        self.interval_s = interval_s
        self.runs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self.work(first)
            except Exception:
                log.exception("%s failed; trying again in %.0fs", self.name, self.interval_s)
            self.runs += 1
            first = False
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


@dataclass(frozen=True)
class Subscription:
    """One consumer a service runs: a group reading some topics with one handler."""

    topics: tuple[str, ...]
    group_id: str
    handler: Handler


@dataclass
class ServiceHost:
    """Runs one service's gRPC server, outbox relay and consumers on a ``Platform``."""

    platform: Platform
    registrations: Sequence[ServiceRegistration]
    settings: ServiceSettings
    subscriptions: Sequence[Subscription] = ()
    auth_hook: AuthHook | None = None
    # mTLS for the service mesh: gristmill.core.tls.server_credentials(TlsSettings()).
    server_credentials: grpc.ServerCredentials | None = None
    # Run on SIGHUP while serving (on a worker thread): re-read what may change without a restart, such as a
    # renewed licence file (``Security.reload``).
    on_reload: Callable[[], object] | None = None
    # The service's own background work, started after the consumers and stopped before them.
    tasks: Sequence[PeriodicTask] = ()
    _server: GrpcServer | None = field(default=None, init=False)
    _relay: OutboxRelay | None = field(default=None, init=False)
    _consumers: list[Consumer] = field(default_factory=list, init=False)
    _stopped: bool = field(default=False, init=False)

    @property
    def server(self) -> GrpcServer:
        if self._server is None:
            raise RuntimeError("the service host is not started")
        return self._server

    @property
    def relay(self) -> OutboxRelay:
        if self._relay is None:
            raise RuntimeError("the service host is not started")
        return self._relay

    def _build_server(self) -> GrpcServer:
        return GrpcServer(
            self.platform.service,
            self.registrations,
            host=self.settings.host,
            port=self.settings.grpc_port,
            metrics=self.platform.metrics,
            tracer_provider=self.platform.tracer_provider,
            auth_hook=self.auth_hook,
            grace_s=self.settings.shutdown_grace_s,
            server_credentials=self.server_credentials,
            component_health=self.component_health,
        )

    def component_health(self) -> dict[str, bool]:
        """Each event consumer's health under ``gristmill.consumer.<group>`` (gRPC health service names)."""
        return {f"{CONSUMER_HEALTH_PREFIX}{c.group_id}": c.health().ok for c in self._consumers}

    def _open_background_work(self) -> None:
        p = self.platform
        self._relay = OutboxRelay(p.database, p.bus, metrics=p.metrics).start()
        for sub in self.subscriptions:
            consumer = p.bus.subscribe(sub.topics, sub.group_id, sub.handler)
            self._consumers.append(consumer.run_in_background())
        for task in self.tasks:
            task.start()
        if self.settings.metrics_port:
            p.metrics.serve(self.settings.metrics_port, self.settings.host)
        self._server = self._build_server()

    async def start(self) -> int:
        """Start background work, then serve gRPC; returns the bound port."""
        self._open_background_work()
        return await self.server.start()

    async def stop(self) -> None:
        """Drain and close everything, in reverse order of opening. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            await self._server.stop()
        await asyncio.to_thread(self._close_background_work)

    def _close_background_work(self) -> None:
        for task in reversed(self.tasks):
            task.stop()
        for consumer in reversed(self._consumers):
            consumer.stop()
        if self._relay is not None:
            self._relay.stop()
            try:
                # Publish what the last calls wrote; what cannot be published now stays for next start.
                self._relay.relay_once()
            except GristmillError as exc:
                log.warning("outbox not fully published at shutdown (kept for next start): %s", exc)
        self.platform.close()

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully; SIGHUP runs ``on_reload``."""
        self._open_background_work()
        with self.reload_on_sighup():
            await serve_until_signal(self.server, on_stop=[lambda: asyncio.to_thread(self._close_background_work)])
        self._stopped = True

    @contextlib.contextmanager
    def reload_on_sighup(self) -> Iterator[None]:
        """While inside, SIGHUP runs ``on_reload`` on a worker thread (no-op without one)."""
        reload = self.on_reload
        if reload is None:
            yield
            return
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload))
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
