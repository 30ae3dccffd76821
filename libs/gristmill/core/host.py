"""What every service process is made of, wired once: the platform it runs on and its lifecycle.

``open_platform`` turns a service's settings and its ``Infrastructure`` (Kafka, S3, telemetry; every
service's ``build_app(settings, infra, security, ...)`` takes one) into the platform it runs on (database,
object store, event bus, tracer, metrics): Kafka when ``GRISTMILL_KAFKA_BOOTSTRAP_SERVERS`` is set, else the
in-process bus; S3 when ``GRISTMILL_S3_ENDPOINT`` is set, else a directory under the data dir.

``ServiceHost`` runs one service on it as a list of ``Component``s (async ``open``/``close``) on a
``contextlib.AsyncExitStack``: the platform, the service's own components (a Ray cluster, model deployments,
a job supervisor), the outbox relay, the event consumers, the service's own background tasks
(``PeriodicTask``) and the gRPC server, opened in that order and closed in reverse (health NOT_SERVING → drain
in-flight calls → stop tasks and consumers → stop the relay → close the service's own components → flush the
outbox one last time → close the bus → close the database; ``ServiceHost`` has the details). A service's
``app.py`` builds one (its app's ``host``); ``gristmill.core.service.run_service`` runs it until a signal.
Every mode (``python -m``, the embedded platform, tests) runs the same components.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import MetaData

from gristmill.core.errors import GristmillError
from gristmill.core.events import (
    BatchHandler,
    Consumer,
    EventBus,
    EventCatalog,
    Handler,
    MemoryBroker,
    MemoryEventBus,
    OutboxRelay,
)
from gristmill.core.events.topics import platform_catalog
from gristmill.core.grpcserver import AuthHook, GrpcServer, ServiceRegistration
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.settings import KafkaSettings, S3Settings, ServiceSettings, TelemetrySettings, load_settings
from gristmill.core.sql import Database
from gristmill.core.storage import ObjectStore, open_object_store
from gristmill.core.telemetry import setup_tracing
from gristmill.core.tls import reload_certificates

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


@dataclass(frozen=True)
class Infrastructure:
    """What a service runs on besides its own settings: the event bus, the object store, telemetry.

    The defaults are the embedded mode: no Kafka (the in-process bus), no S3 (a directory under the data dir),
    a tracer from ``telemetry`` (none: no exporter). ``memory_broker`` lets several services in one process
    (embedded mode, tests) share the in-process bus; ``tracer_provider`` replaces the one ``telemetry`` would
    set up (tests). ``from_environment`` reads the settings a service's ``python -m`` runs with.
    """

    kafka: KafkaSettings = field(default_factory=lambda: KafkaSettings(bootstrap_servers=""))
    s3: S3Settings = field(default_factory=lambda: S3Settings(endpoint=""))
    telemetry: TelemetrySettings | None = None
    memory_broker: MemoryBroker | None = None
    tracer_provider: TracerProvider | None = None

    @classmethod
    def from_environment(cls) -> Infrastructure:
        """``GRISTMILL_KAFKA_*``, ``GRISTMILL_S3_*`` and ``OTEL_*``; a bad value raises ``ConfigurationError``."""
        return cls(
            kafka=load_settings(KafkaSettings), s3=load_settings(S3Settings), telemetry=load_settings(TelemetrySettings)
        )

    @property
    def embedded(self) -> bool:
        """No Kafka: the in-process bus, one process (the embedded dev mode, tests)."""
        return not self.kafka.bootstrap_servers


def open_platform(
    service: str,
    settings: ServiceSettings,
    infra: Infrastructure,
    *,
    tables: Sequence[MetaData] = (),
) -> Platform:
    """Open the database (its schema brought to head by the service's migrations, or ``tables`` created for a
    service without any: ``gristmill.core.migrations.upgrade_to_head``), object store, bus, tracer and metrics
    for ``service`` on ``infra``.
    """
    from gristmill.core.migrations import upgrade_to_head

    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    metrics = ServiceMetrics(service)
    provider = infra.tracer_provider or setup_tracing(service, infra.telemetry)
    database = Database(settings.resolved_database_url(service))
    upgrade_to_head(database, service, tables)
    bus: EventBus
    if not infra.embedded:
        from gristmill.core.events.kafka import KafkaEventBus

        bus = KafkaEventBus(infra.kafka, database=database, tracer_provider=provider, metrics=metrics)
    else:
        bus = MemoryEventBus(infra.memory_broker, database=database, tracer_provider=provider, metrics=metrics)
    objects = open_object_store(infra.s3, Path(settings.data_dir))
    return Platform(service, database, objects, bus, platform_catalog(), provider, metrics)


@runtime_checkable
class Component(Protocol):
    """One part of a service that the host runs: opened at start in the host's order, closed at stop in reverse.

    ``open`` may raise (the host then closes what it had opened and re-raises); ``close`` is called once, only
    after ``open`` returned, and should not raise (the host logs what it raises and goes on closing the rest).
    """

    @property
    def name(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...


async def _call(fn: Callable[[], object] | None, *, in_thread: bool) -> None:
    if fn is None:
        return
    result = await asyncio.to_thread(fn) if in_thread and not inspect.iscoroutinefunction(fn) else fn()
    if inspect.isawaitable(result):
        await result


@dataclass
class Callbacks:
    """A component made of two callables, either of which may be ``async``. A plain ``on_open`` runs on the
    event loop (a start should be quick); a plain ``on_close`` on a worker thread (it may join threads)."""

    name: str
    on_open: Callable[[], object] | None = None
    on_close: Callable[[], object] | None = None

    async def open(self) -> None:
        await _call(self.on_open, in_thread=False)

    async def close(self) -> None:
        await _call(self.on_close, in_thread=True)


class PeriodicTask:
    """A service's own background work (finishing what an earlier run left half-done, sweeping), run by the
    host in every mode (networked, embedded, tests) on a daemon thread: ``work`` at start (its argument is
    ``True`` then), then every ``interval_s``. An exception is logged and retried at the next interval; the
    thread ends with the host. ``work`` must be safe to interrupt: a stop does not wait for it to finish.
    A ``Component``."""

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

    async def open(self) -> None:
        self.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)


@dataclass(frozen=True)
class Subscription:
    """One consumer a service runs: a group reading some topics with one handler (per event, or per fetched
    batch when it is a ``BatchHandler``)."""

    topics: tuple[str, ...]
    group_id: str
    handler: Handler | BatchHandler


@dataclass
class _ConsumerComponent:
    bus: EventBus
    subscription: Subscription
    consumer: Consumer | None = None
    # The host's consumers, this one included: closing the first asks them all to stop, so that their last polls
    # end together (one poll's wait) rather than one after another.
    siblings: list[_ConsumerComponent] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"consumer:{self.subscription.group_id}"

    async def open(self) -> None:
        sub = self.subscription
        consumer = self.bus.subscribe(sub.topics, sub.group_id, sub.handler)
        self.consumer = consumer.run_in_background(poll_timeout_s=self.bus.idle_poll_s)

    async def close(self) -> None:
        for sibling in self.siblings:
            if sibling.consumer is not None:
                sibling.consumer.request_stop()
        if self.consumer is not None:
            await asyncio.to_thread(self.consumer.stop)


@dataclass
class _ServerComponent:
    server: GrpcServer
    name: str = "grpc-server"

    async def open(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        # Health NOT_SERVING, stop accepting, drain in-flight calls: before anything they use is closed.
        await self.server.stop()


@dataclass
class ServiceHost:
    """Runs one service on a ``Platform``: its components, the gRPC server last. Never subclassed: what a
    service adds (its Ray cluster, its deployments, a supervisor) it hands in as ``components``.

    Opened in this order, closed in reverse (each on a ``contextlib.AsyncExitStack``):

    1. ``platform``: closes the bus, then the database (last of all);
    2. ``outbox-flush``: at close, publishes what was written to the outbox since the relay stopped (what cannot
       be published now stays for the next start);
    3. the service's own ``components``, in the order given: opened before any host thread (so that a local
       Ray cluster forks no process while the relay or a consumer runs), closed once the server has drained
       and the consumers have stopped, and before the last outbox flush (what they write while closing is
       published);
    4. ``outbox-relay``: the relay's thread;
    5. one ``consumer:<group>`` per subscription;
    6. the ``tasks`` (``PeriodicTask``);
    7. ``metrics`` (the Prometheus endpoint, when ``metrics_port`` is set);
    8. ``grpc-server``: closed first (health NOT_SERVING, then in-flight calls drain).
    """

    platform: Platform
    registrations: Sequence[ServiceRegistration]
    settings: ServiceSettings
    subscriptions: Sequence[Subscription] = ()
    auth_hook: AuthHook | None = None
    # mTLS for the service mesh: gristmill.core.tls.server_credentials(TlsSettings()).
    server_credentials: grpc.ServerCredentials | None = None
    # Run on SIGHUP while serving (on a worker thread): re-read what may change without a restart, such as a
    # renewed licence file (``Security.reload``). SIGHUP also re-reads the TLS certificate files of the server and
    # of the channels to other services (``gristmill.core.tls.reload_certificates``), with or without this.
    on_reload: Callable[[], object] | None = None
    # The service's own background work, started after the consumers and stopped before them.
    tasks: Sequence[PeriodicTask] = ()
    # The service's own parts (see the class docstring for where they open and close).
    components: Sequence[Component] = ()
    _server: GrpcServer | None = field(default=None, init=False)
    _relay: OutboxRelay | None = field(default=None, init=False)
    _consumers: list[_ConsumerComponent] = field(default_factory=list, init=False)
    _stack: contextlib.AsyncExitStack | None = field(default=None, init=False)
    _opened: list[str] = field(default_factory=list, init=False)
    _state: str = field(default="new", init=False)

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

    @property
    def opened(self) -> list[str]:
        """The names of the components open now, in the order they were opened."""
        return list(self._opened)

    def component_health(self) -> dict[str, bool]:
        """Each event consumer's health under ``gristmill.consumer.<group>`` (gRPC health service names)."""
        return {
            f"{CONSUMER_HEALTH_PREFIX}{c.subscription.group_id}": c.consumer.health().ok
            for c in self._consumers
            if c.consumer is not None
        }

    def _components(self) -> list[Component]:
        p, settings = self.platform, self.settings
        self._relay = relay = OutboxRelay(p.database, p.bus, metrics=p.metrics, linger_s=settings.outbox_linger_s)
        self._consumers = [_ConsumerComponent(p.bus, sub) for sub in self.subscriptions]
        for component in self._consumers:
            component.siblings = self._consumers
        self._server = GrpcServer(
            p.service,
            self.registrations,
            host=settings.host,
            port=settings.grpc_port,
            metrics=p.metrics,
            tracer_provider=p.tracer_provider,
            auth_hook=self.auth_hook,
            grace_s=settings.shutdown_grace_s,
            server_credentials=self.server_credentials,
            component_health=self.component_health,
        )
        metrics: list[Component] = []
        if settings.metrics_port:
            port = settings.metrics_port
            metrics.append(Callbacks("metrics", on_open=lambda: p.metrics.serve(port, settings.host)))
        return [
            Callbacks("platform", on_close=p.close),
            Callbacks("outbox-flush", on_close=lambda: _flush_outbox(relay)),
            *self.components,
            Callbacks("outbox-relay", on_open=relay.start, on_close=relay.stop),
            *self._consumers,
            *self.tasks,
            *metrics,
            _ServerComponent(self._server),
        ]

    async def start(self) -> int:
        """Open every component in order (the gRPC server last); returns the bound port. If one fails to open,
        what was opened is closed again (in reverse) and the error raised."""
        if self._state != "new":
            raise RuntimeError(f"the service host is {self._state}; build a new one")
        self._state = "started"
        async with contextlib.AsyncExitStack() as stack:
            for component in self._components():
                await component.open()
                self._opened.append(component.name)
                stack.push_async_callback(self._close, component)
            self._stack = stack.pop_all()
        return self.server.port

    async def _close(self, component: Component) -> None:
        try:
            await component.close()
        except Exception:
            log.exception("%s: closing %s failed", self.platform.service, component.name)
        finally:
            self._opened.remove(component.name)

    async def stop(self) -> None:
        """Close every component in reverse order of opening. Safe to call twice, and on a host never started
        (it closes the platform)."""
        state, self._state = self._state, "stopped"
        if state == "new":
            await asyncio.to_thread(self.platform.close)
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def run_until_signal(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Start, serve until SIGTERM/SIGINT, then stop gracefully; SIGHUP runs ``on_reload`` meanwhile."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await self.start()
            with self.reload_on_sighup():
                await stop_requested.wait()
            log.info("%s received a stop signal", self.platform.service)
        finally:
            await self.stop()
            for sig in signals:
                loop.remove_signal_handler(sig)

    def reload(self) -> None:
        """What SIGHUP does: re-read the TLS certificate files (new connections to this server get the renewed
        certificate, and calls to other services go over new channels presenting it; a file that cannot be used
        keeps the running one, logged), then the service's ``on_reload``."""
        reload_certificates()
        if self.on_reload is not None:
            self.on_reload()

    @contextlib.contextmanager
    def reload_on_sighup(self) -> Iterator[None]:
        """While inside, SIGHUP runs ``reload`` on a worker thread."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, self.reload))
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _flush_outbox(relay: OutboxRelay) -> None:
    try:
        relay.relay_once()
    except GristmillError as exc:
        log.warning("outbox not fully published at shutdown (kept for next start): %s", exc)
