"""The event bus interface and the behaviour every implementation shares.

``EventBus`` (publish + subscribe) is implemented twice: ``MemoryEventBus`` (embedded mode, unit tests) and
``KafkaEventBus``. An implementation provides only the transport: write a raw record, fetch records,
commit and rewind offsets. Everything else is here, once: the publish span and record headers, and, per
consumed record, header parsing, the ``event-id`` dedupe, the handler call in a database transaction, the
dead-letter path and the offset commit.

Per consumed record:

1. parse the headers (``Event.from_record``); a malformed record goes to ``<topic>.dlq``;
2. in one transaction of the bus's database: skip it if this group already handled its ``event-id``, else
   call ``handler(event, session)`` and mark it handled, so the handler's own writes and the mark commit
   together;
3. a handler exception rolls that transaction back and sends the original record to ``<topic>.dlq`` with
   headers ``error`` (one line) and ``error-type``;
4. commit the offset only once the record was handled, skipped or dead-lettered. When the dead-letter
   write or the database fails, nothing after that record is committed and the consumer rewinds to it, so
   it is retried (the run loop backs off).

A consumer running in the background also watches its own place in the group (``Membership``): a member
that stays unsettled (joining or rebalancing, or holding none of its topics' partitions while the group
has no other member to hold them) for longer than ``stall_timeout_s`` re-creates its client and rejoins,
logs why at WARNING and counts it (``gristmill_consumer_rejoins_total``); ``health()`` reports it
meanwhile, and the service host turns that into the component's gRPC health.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import ClassVar, Self

from opentelemetry import trace
from opentelemetry.trace import SpanKind, TracerProvider
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.errors import ConfigurationError, FailedPreconditionError, InvalidArgumentError, UnavailableError
from gristmill.core.events.envelope import (
    Event,
    Headers,
    MalformedEventError,
    dead_letter_topic,
    validate_key,
    validate_topic,
)
from gristmill.core.events.handled import HandledEvent, is_handled, mark_handled
from gristmill.core.ids import validate_id
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.sql import Database
from gristmill.core.telemetry import extract_context, inject_headers

log = logging.getLogger(__name__)

# A handler receives the event and the session of the transaction that marks it handled: write the state
# change through that session (and never commit it yourself) so both commit together.
Handler = Callable[[Event, Session], None]

HEADER_ERROR = "error"
HEADER_ERROR_TYPE = "error-type"
_ERROR_MAX = 500

HANDLED = "handled"
DUPLICATE = "duplicate"
DEAD_LETTERED = "dead_lettered"

# (topic, partition)
TopicPartition = tuple[str, int]

STABLE = "stable"


@dataclass(frozen=True, slots=True)
class Membership:
    """A consumer's place in its group, as its client sees it.

    ``state``: ``stable`` once joined and synced; otherwise the transport's word (``rebalancing``, ``unjoined``).
    ``partitions``: how many partitions the subscribed topics have, as far as the client knows.
    ``others_can_hold``: the group has more members than partitions, so an empty assignment is expected.
    """

    state: str
    assigned: tuple[TopicPartition, ...]
    partitions: int
    others_can_hold: bool = False

    @property
    def settled(self) -> bool:
        if self.state != STABLE:
            return False
        return bool(self.assigned) or self.partitions == 0 or self.others_can_hold

    def describe(self) -> str:
        held = ", ".join(f"{t}[{p}]" for t, p in self.assigned) or "no partitions"
        return f"state {self.state}, holding {held} of {self.partitions}"


@dataclass(frozen=True, slots=True)
class ConsumerHealth:
    """``ok`` False while the consumer is stalled (``reason`` says how); a stopped consumer is not ok either."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """A record as fetched from a topic: raw bytes and headers, before any parsing."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers


class EventPublisher(ABC):
    """Publishes events. ``publish`` returns once the bus has durably accepted the event."""

    @abstractmethod
    def publish(self, event: Event) -> None:
        """Publish ``event``; raise ``UnavailableError`` when the bus cannot take it (nothing is retried)."""

    def flush(self, timeout_s: float | None = None) -> None:  # noqa: B027 - optional hook
        """Wait until everything published so far is delivered (``publish`` already waits, so usually a no-op)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class EventSubscriber(ABC):
    @abstractmethod
    def subscribe(self, topics: Sequence[str], group_id: str, handler: Handler) -> Consumer:
        """A consumer of ``topics`` in consumer group ``group_id``; call ``poll_once`` or ``run_in_background``."""


class EventBus(EventPublisher, EventSubscriber):
    """Publish and subscribe over one transport. ``database`` holds the handled-events table (needed to subscribe)."""

    system: ClassVar[str]

    def __init__(
        self,
        *,
        database: Database | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.tracer = trace.get_tracer("gristmill.core.events", tracer_provider=tracer_provider)
        self._consumers: list[Consumer] = []
        self._consumers_lock = threading.Lock()

    # -- transport, provided by each implementation -------------------------------------------------------

    @abstractmethod
    def publish_record(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        """Write one record as-is and wait for the transport to accept it (``UnavailableError`` if it does not).

        Used for dead letters and replays; application code publishes ``Event``s.
        """

    @abstractmethod
    def _open_consumer(self, topics: tuple[str, ...], group_id: str, handler: Handler) -> Consumer: ...

    def _close_transport(self) -> None:
        """Release the transport's connections (called once by ``close``)."""

    # -- shared behaviour ---------------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        validate_topic(event.topic)
        validate_key(event.key)
        # The producer span continues the trace of the code that created the event (which may have been
        # another thread, or a request long gone when the outbox relay publishes it).
        parent = extract_context(event.trace_headers) if event.trace_headers else None
        with self.tracer.start_as_current_span(
            f"{event.topic} publish",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": self.system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": event.topic,
                "messaging.message.id": event.event_id,
                "messaging.kafka.message.key": event.key,
            },
        ):
            # The consumer's span is a child of this producer span: re-inject the now-current context.
            headers = replace(event, trace_headers=tuple(inject_headers())).to_headers()
            self.publish_record(event.topic, event.key.encode("ascii"), event.payload, headers)
        if self.metrics is not None:
            self.metrics.events_published.labels(self.metrics.service, event.topic).inc()

    def subscribe(self, topics: Sequence[str], group_id: str, handler: Handler) -> Consumer:
        if isinstance(topics, str):
            topics = [topics]
        checked = tuple(dict.fromkeys(validate_topic(t) for t in topics))
        if not checked:
            raise InvalidArgumentError("subscribe needs at least one topic")
        validate_id(group_id, what="consumer group id")
        if self.database is None:
            raise ConfigurationError(
                "this event bus has no database: consumers need one for the handled-events table "
                "(pass database= to the bus)"
            )
        HandledEvent.metadata.tables[HandledEvent.__tablename__].create(self.database.engine, checkfirst=True)
        consumer = self._open_consumer(checked, group_id, handler)
        with self._consumers_lock:
            self._consumers.append(consumer)
        return consumer

    def close(self) -> None:
        """Stop the consumers this bus opened (newest first), then close the transport. Safe to call twice."""
        with self._consumers_lock:
            consumers, self._consumers = self._consumers, []
        for consumer in reversed(consumers):
            consumer.stop()
        self._close_transport()


class _HandlerFailed(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _AlreadyHandled(Exception):
    pass


class Consumer(ABC):
    """One consumer-group member. Use ``poll_once`` (tests, custom loops) or ``run_in_background``.

    As a context manager it stops (and closes) on exit; ``stop`` is safe to call twice.
    """

    def __init__(self, bus: EventBus, topics: tuple[str, ...], group_id: str, handler: Handler) -> None:
        self.bus = bus
        self.topics = topics
        self.group_id = group_id
        self._handler = handler
        self._poll_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The error that made the background loop back off most recently (None once it recovers).
        self.last_error: BaseException | None = None
        # The watchdog's view (background loop only): since when the membership has been unsettled, the last
        # assignment logged, why the consumer counts as stalled now, and since when a fetch has been running.
        self.stall_timeout_s = 30.0
        self._unsettled_since: float | None = None
        self._last_assigned: tuple[TopicPartition, ...] | None = None
        self._stall_reason = ""
        self._fetch_started: float | None = None
        self.rejoins = 0

    # -- transport, provided by each implementation -------------------------------------------------------

    @abstractmethod
    def _fetch(self, timeout_s: float) -> list[Record]:
        """Records after the current position (at most ``timeout_s`` waiting); advances the position."""

    @abstractmethod
    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit, for this group, the next offset to read in each partition."""

    @abstractmethod
    def _rewind(self, offsets: dict[TopicPartition, int]) -> None:
        """Move the position back so that these offsets are fetched again."""

    @abstractmethod
    def _close_client(self) -> None: ...

    def membership(self) -> Membership:
        """This member's place in its group. The default (the in-process bus) is always settled."""
        return Membership(state=STABLE, assigned=(), partitions=0)

    def _recreate_client(self) -> None:  # noqa: B027 - optional hook
        """Close the client and open a new one that joins the group afresh (positions restart at the
        committed offsets). Called by the watchdog from the background loop."""

    # -- shared behaviour ---------------------------------------------------------------------------------

    def poll_once(self, timeout_s: float = 1.0) -> int:
        """Fetch (waiting at most ``timeout_s``) and process one batch; return how many records were consumed.

        A consumed record was handled, skipped as a duplicate or dead-lettered, and its offset is committed.
        Raises (after rewinding) when a record could not be settled: the dead-letter write or the database
        failed; the next poll retries from that record.
        """
        if self.running and threading.current_thread() is not self._thread:
            raise FailedPreconditionError("this consumer runs in the background; do not poll it from another thread")
        with self._poll_lock:
            if self._closed:
                raise FailedPreconditionError(f"consumer of {', '.join(self.topics)} is closed")
            self._fetch_started = time.monotonic()
            try:
                records = self._fetch(timeout_s)
            finally:
                self._fetch_started = None
            done: dict[TopicPartition, int] = {}
            consumed = 0
            failure: Exception | None = None
            for record in records:
                try:
                    self._process(record)
                except Exception as exc:
                    failure = exc
                    break
                done[(record.topic, record.partition)] = record.offset + 1
                consumed += 1
            try:
                if done:
                    self._commit(done)
            except Exception:
                # Nothing of this batch is known to be committed: read it all again (duplicates are skipped).
                self._rewind(_first_offsets(records))
                raise
            if failure is not None:
                self._rewind(_first_offsets(records[consumed:]))
                raise failure
            return consumed

    def _process(self, record: Record) -> None:
        bus = self.bus
        with bus.tracer.start_as_current_span(
            f"{record.topic} process",
            context=extract_context(record.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": bus.system,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": record.topic,
                "messaging.consumer.group.name": self.group_id,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
            },
        ) as span:
            try:
                event = Event.from_record(record.topic, record.key, record.value, record.headers)
            except MalformedEventError as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                self._dead_letter(record, exc)
                outcome = DEAD_LETTERED
            else:
                span.set_attribute("messaging.message.id", event.event_id)
                try:
                    outcome = self._handle(event)
                except _HandlerFailed as failed:
                    span.record_exception(failed.cause)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"handler failed: {failed.cause!r}"))
                    self._dead_letter(record, failed.cause)
                    outcome = DEAD_LETTERED
                if bus.metrics is not None and outcome == HANDLED:
                    lag = (datetime.now(UTC) - event.event_time).total_seconds()
                    bus.metrics.event_lag.labels(bus.metrics.service, record.topic).set(max(lag, 0.0))
            span.set_attribute("gristmill.outcome", outcome)
        if bus.metrics is not None:
            bus.metrics.events_handled.labels(bus.metrics.service, record.topic, outcome).inc()

    def _handle(self, event: Event) -> str:
        """Run the handler once per (group, event-id); raise ``_HandlerFailed`` if it raised."""
        database = self.bus.database
        assert database is not None  # checked by subscribe
        try:
            with database.transaction() as session:
                if is_handled(session, self.group_id, event.event_id):
                    log.info("skipping duplicate event %s on %s (group %s)", event.event_id, event.topic, self.group_id)
                    return DUPLICATE
                try:
                    self._handler(event, session)
                    session.flush()
                except UnavailableError:
                    # A dependency is down (object store, another service): the record is fine, so it is
                    # retried after a backoff rather than dead-lettered.
                    raise
                except Exception as exc:
                    raise _HandlerFailed(exc) from exc
                mark_handled(session, self.group_id, event.event_id)
                try:
                    session.flush()
                except IntegrityError:
                    # Another member of the group handled it concurrently (a rebalance): undo ours.
                    raise _AlreadyHandled from None
        except _AlreadyHandled:
            return DUPLICATE
        return HANDLED

    def _dead_letter(self, record: Record, exc: BaseException) -> None:
        reason = " ".join(str(exc).split())[:_ERROR_MAX] or type(exc).__name__
        log.warning("dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        headers = [(k, v) for k, v in record.headers if k not in (HEADER_ERROR, HEADER_ERROR_TYPE)]
        headers.append((HEADER_ERROR, reason.encode("utf-8")))
        headers.append((HEADER_ERROR_TYPE, type(exc).__qualname__.encode("ascii")))
        self.bus.publish_record(dead_letter_topic(record.topic), record.key, record.value, headers)

    # -- lifecycle ----------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_in_background(
        self, *, poll_timeout_s: float = 0.2, retry_backoff_s: float = 0.5, max_backoff_s: float = 30.0
    ) -> Self:
        """Poll in a daemon thread until ``stop``; failures are logged and retried with capped backoff."""
        with self._state_lock:
            if self._closed:
                raise FailedPreconditionError("consumer is closed")
            if self._thread is not None:
                return self
            self._thread = threading.Thread(
                target=self._run,
                args=(poll_timeout_s, retry_backoff_s, max_backoff_s),
                name=f"consumer-{self.group_id}",
                daemon=True,
            )
            self._thread.start()
        return self

    def _run(self, poll_timeout_s: float, retry_backoff_s: float, max_backoff_s: float) -> None:
        backoff = retry_backoff_s
        next_watch = 0.0
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                consumed = self.poll_once(poll_timeout_s)
            except Exception as exc:
                self.last_error = exc
                log.warning(
                    "consumer %s of %s: %s; retrying in %.1fs", self.group_id, ",".join(self.topics), exc, backoff
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, max_backoff_s)
            else:
                self.last_error = None
                backoff = retry_backoff_s
                # A client that cannot fetch (no coordinator, no assignment) may return at once: wait out the
                # poll timeout rather than spin a core.
                idle = poll_timeout_s - (time.monotonic() - began)
                if not consumed and idle > 0.01:
                    self._stopping.wait(idle)
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + min(5.0, self.stall_timeout_s / 3)
                self._watch(now)

    def _watch(self, now: float) -> None:
        """Log assignment changes; re-create the client of a member unsettled for longer than the bound."""
        try:
            membership = self.membership()
        except Exception as exc:  # the watchdog must never take the loop down
            log.warning("consumer %s: could not read its group membership: %s", self.group_id, exc)
            return
        if membership.assigned != self._last_assigned and membership.state == STABLE:
            self._last_assigned = membership.assigned
            log.info("consumer %s of %s: %s", self.group_id, ",".join(self.topics), membership.describe())
        if self.bus.metrics is not None:
            self.bus.metrics.consumer_assigned.labels(self.bus.metrics.service, self.group_id).set(
                len(membership.assigned)
            )
        if membership.settled:
            self._unsettled_since = None
            self._stall_reason = ""
            return
        if self._unsettled_since is None:
            self._unsettled_since = now
            return
        waited = now - self._unsettled_since
        if waited < self.stall_timeout_s:
            return
        self._stall_reason = f"{membership.describe()} for {waited:.0f}s"
        log.warning(
            "consumer %s of %s stalled (%s): re-creating its client and rejoining the group",
            self.group_id,
            ",".join(self.topics),
            self._stall_reason,
        )
        self.rejoins += 1
        if self.bus.metrics is not None:
            self.bus.metrics.consumer_rejoins.labels(self.bus.metrics.service, self.group_id).inc()
        try:
            with self._poll_lock:
                if not self._closed:
                    self._recreate_client()
        except Exception as exc:
            log.warning("consumer %s: re-creating its client failed (%s); trying again later", self.group_id, exc)
        # The new client gets the same bound before it counts as stalled again.
        self._unsettled_since = time.monotonic()

    def health(self) -> ConsumerHealth:
        """Whether this consumer does its job now: running, not stalled, and not stuck inside its client."""
        if self._closed or self._stopping.is_set():
            return ConsumerHealth(False, "stopped")
        if self._stall_reason:
            return ConsumerHealth(False, f"stalled: {self._stall_reason}")
        started = self._fetch_started
        if started is not None and time.monotonic() - started > self.stall_timeout_s:
            return ConsumerHealth(False, f"a fetch has not returned for {time.monotonic() - started:.0f}s")
        return ConsumerHealth(True)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the background loop (letting the current record finish) and close. Safe to call twice."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            deadline = time.monotonic() + timeout_s
            thread.join(max(deadline - time.monotonic(), 0))
            if thread.is_alive():
                log.warning("consumer %s did not stop within %.0fs", self.group_id, timeout_s)
        with self._poll_lock, self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._close_client()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _first_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for record in records:
        first.setdefault((record.topic, record.partition), record.offset)
    return first
