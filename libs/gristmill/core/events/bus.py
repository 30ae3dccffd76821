"""The event bus interface and the behaviour every implementation shares.

``EventBus`` (publish + subscribe) is implemented twice: ``MemoryEventBus`` (embedded mode, unit tests) and
``KafkaEventBus``. An implementation provides only the transport: write a raw record, fetch records,
commit and rewind offsets. Everything else is here, once: the publish span and record headers, and, per
consumed record, header parsing, the ``event-id`` dedupe, the handler call in a database transaction, the
dead-letter path and the offset commit.

Publishing: ``publish_many`` sends every record of a batch before it waits for the first acknowledgement (one
round trip on Kafka) and reports how many events, in order, were confirmed before the first failure; the
outbox relay publishes through it. ``publish`` is a batch of one.

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

A ``BatchHandler`` settles a whole fetched batch in one transaction instead: one query drops the events this
group already handled, the handler runs once with the rest, all are marked handled, then malformed records
are dead-lettered. When the handler raises (other than ``UnavailableError``) that transaction rolls back and
the batch is settled record by record as above, the handler given one event at a time, so a bad event is
dead-lettered alone and the others count once. ``UnavailableError`` rewinds the whole batch, nothing settled.

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
from opentelemetry.trace import Span, SpanKind, TracerProvider
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
from gristmill.core.events.handled import HandledEvent, handled_among, is_handled, mark_all_handled
from gristmill.core.ids import validate_id
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.sql import Database
from gristmill.core.telemetry import extract_context, inject_headers

log = logging.getLogger(__name__)

# A handler receives the event and the session of the transaction that marks it handled: write the state
# change through that session (and never commit it yourself) so both commit together.
Handler = Callable[[Event, Session], None]


@dataclass(frozen=True, slots=True)
class BatchHandler:
    """A handler of whole fetched batches; subscribe with ``BatchHandler(fn)`` where a ``Handler`` would go.

    ``handle(events, session)`` runs once per poll with the batch's events not handled yet by the group (in
    fetch order, duplicates dropped), in the one transaction that marks them all handled. When it raises
    (other than ``UnavailableError``) nothing of the batch is written and each event is handled again alone,
    as ``handle([event], session)``: raise for the whole batch when one event is bad, and only that one is
    dead-lettered.
    """

    handle: Callable[[Sequence[Event], Session], None]


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


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """What ``publish_many`` achieved: its first ``confirmed`` events are durably accepted; ``error`` is why the
    next one was not (None when all were). Events after that one may have reached the bus or not: publish them
    again (consumers drop duplicates by ``event-id``)."""

    confirmed: int
    error: Exception | None = None


class EventPublisher(ABC):
    """Publishes events. ``publish`` returns once the bus has durably accepted the event."""

    @abstractmethod
    def publish(self, event: Event) -> None:
        """Publish ``event``; raise ``UnavailableError`` when the bus cannot take it (nothing is retried)."""

    def publish_many(self, events: Sequence[Event]) -> PublishOutcome:
        """Publish ``events`` in order; report how many were confirmed before the first failure (which is
        returned, not raised). This default publishes them one by one."""
        for index, event in enumerate(events):
            try:
                self.publish(event)
            except Exception as exc:
                return PublishOutcome(index, exc)
        return PublishOutcome(len(events))

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
    def subscribe(self, topics: Sequence[str], group_id: str, handler: Handler | BatchHandler) -> Consumer:
        """A consumer of ``topics`` in consumer group ``group_id``; call ``poll_once`` or ``run_in_background``."""


class EventBus(EventPublisher, EventSubscriber):
    """Publish and subscribe over one transport. ``database`` holds the handled-events table (needed to subscribe)."""

    system: ClassVar[str]
    # How long a service's background consumer waits in one poll when nothing arrives (``ServiceHost``): a record
    # ends the wait at once, a stop waits for it to end.
    idle_poll_s: ClassVar[float] = 0.2

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

    def _send_record(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Callable[[], None]:
        """Start writing one record; return the wait for the transport's acceptance (raising ``UnavailableError``).

        This default writes it at once; a transport that pipelines overrides it, so that ``publish_many`` has a
        whole batch in flight before it waits for the first record.
        """
        self.publish_record(topic, key, value, headers)
        return _nothing_to_wait_for

    @abstractmethod
    def _open_consumer(self, topics: tuple[str, ...], group_id: str, handler: Handler | BatchHandler) -> Consumer: ...

    def _close_transport(self) -> None:
        """Release the transport's connections (called once by ``close``)."""

    # -- shared behaviour ---------------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        outcome = self.publish_many((event,))
        if outcome.error is not None:
            raise outcome.error

    def publish_many(self, events: Sequence[Event]) -> PublishOutcome:
        """Send every event's record, then wait for each in order: a batch costs the transport one round trip.
        Each event gets its producer span (open until its record is confirmed) and is counted once confirmed."""
        sent: list[tuple[Event, Span, Callable[[], None]]] = []
        refused: Exception | None = None
        for event in events:
            try:
                sent.append((event, *self._send(event)))
            except Exception as exc:
                refused = exc
                break
        confirmed = 0
        failure: Exception | None = None
        for event, span, wait in sent:
            if failure is not None:
                # Perhaps delivered, perhaps not: the caller publishes it again after the failed one.
                span.set_status(trace.Status(trace.StatusCode.ERROR, "not confirmed: an earlier event failed"))
                span.end()
                continue
            try:
                with trace.use_span(span, end_on_exit=True):
                    wait()
            except Exception as exc:
                failure = exc
                continue
            if self.metrics is not None:
                self.metrics.events_published.labels(self.metrics.service, event.topic).inc()
            confirmed += 1
        return PublishOutcome(confirmed, failure or refused)

    def _send(self, event: Event) -> tuple[Span, Callable[[], None]]:
        """Start ``event``'s producer span and send its record; return the span (for the caller to end) and the
        wait for the record's acceptance."""
        validate_topic(event.topic)
        validate_key(event.key)
        # The producer span continues the trace of the code that created the event (which may have been
        # another thread, or a request long gone when the outbox relay publishes it).
        parent = extract_context(event.trace_headers) if event.trace_headers else None
        span = self.tracer.start_span(
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
        )
        try:
            with trace.use_span(span):
                # The consumer's span is a child of this producer span: re-inject the now-current context.
                headers = replace(event, trace_headers=tuple(inject_headers())).to_headers()
                return span, self._send_record(event.topic, event.key.encode("ascii"), event.payload, headers)
        except Exception:
            span.end()
            raise

    def subscribe(self, topics: Sequence[str], group_id: str, handler: Handler | BatchHandler) -> Consumer:
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

    def __init__(self, bus: EventBus, topics: tuple[str, ...], group_id: str, handler: Handler | BatchHandler) -> None:
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
            consumed, failure = self._settle(records)
            done = _next_offsets(records[:consumed])
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

    def _settle(self, records: list[Record]) -> tuple[int, Exception | None]:
        """Settle ``records`` in order; return how many (a prefix) were settled and the error that stopped the rest."""
        handler = self._handler
        if isinstance(handler, BatchHandler):
            return self._settle_batch(records, handler) if records else (0, None)
        return self._settle_each(records, handler)

    def _settle_each(
        self, records: Sequence[Record], handle: Handler, spans: Sequence[Span] | None = None
    ) -> tuple[int, Exception | None]:
        """One transaction per record. ``spans``: the records' spans, when already started (a batch's fallback)."""
        for index, record in enumerate(records):
            span = spans[index] if spans is not None else self._start_span(record)
            try:
                with trace.use_span(span, end_on_exit=True):
                    self._process(record, span, handle)
            except Exception as exc:
                if spans is not None:
                    _end_unsettled(spans[index + 1 :], "not settled: an earlier record failed")
                return index, exc
        return len(records), None

    def _settle_batch(self, records: Sequence[Record], batch: BatchHandler) -> tuple[int, Exception | None]:
        """One transaction for the whole batch, then the dead letters of malformed records (see the module doc)."""
        spans = [self._start_span(record) for record in records]
        parsed = [self._parse(record, span) for record, span in zip(records, spans, strict=True)]
        try:
            outcomes = iter(self._handle_batch([item for item in parsed if isinstance(item, Event)], batch))
        except (_HandlerFailed, _AlreadyHandled) as exc:
            # A bad event (or a rebalance: another member handled some) spoiled the batch, and nothing of it was
            # written: settle each record alone, so that only the bad one is dead-lettered.
            cause = exc.cause if isinstance(exc, _HandlerFailed) else "handled concurrently by another member"
            log.info(
                "consumer %s: a batch of %d records failed (%s); settling them one by one",
                self.group_id,
                len(records),
                cause,
            )
            return self._settle_each(records, lambda event, session: batch.handle((event,), session), spans)
        except Exception as exc:
            # The database or a dependency is down (UnavailableError): nothing was written or dead-lettered, so
            # the whole batch is fetched again after the backoff.
            _end_unsettled(spans, f"not settled: {type(exc).__name__}: {exc}")
            return 0, exc
        failure: tuple[int, Exception] | None = None
        for index, (record, span, item) in enumerate(zip(records, spans, parsed, strict=True)):
            with trace.use_span(span, end_on_exit=True):
                if isinstance(item, Event):
                    # Committed above whatever happens to the dead letters below.
                    self._settled(record, span, item, next(outcomes))
                elif failure is not None:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, "not dead-lettered: an earlier one failed"))
                else:
                    try:
                        self._reject(record, span, item)
                    except Exception as exc:
                        # Stop at this record: the events after it, already handled, are skipped as duplicates
                        # when they are fetched again.
                        span.record_exception(exc)
                        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                        failure = (index, exc)
                    else:
                        self._settled(record, span, item, DEAD_LETTERED)
        return failure if failure is not None else (len(records), None)

    def _start_span(self, record: Record) -> Span:
        bus = self.bus
        return bus.tracer.start_span(
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
        )

    def _process(self, record: Record, span: Span, handle: Handler) -> None:
        """Settle one record in a transaction of its own (raises when it could not be settled)."""
        item = self._parse(record, span)
        if isinstance(item, MalformedEventError):
            self._reject(record, span, item)
            outcome = DEAD_LETTERED
        else:
            try:
                outcome = self._handle(item, handle)
            except _HandlerFailed as failed:
                span.record_exception(failed.cause)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"handler failed: {failed.cause!r}"))
                self._dead_letter(record, failed.cause)
                outcome = DEAD_LETTERED
        self._settled(record, span, item, outcome)

    @staticmethod
    def _parse(record: Record, span: Span) -> Event | MalformedEventError:
        """The record's event, or why it is malformed (returned: the caller dead-letters it when it can)."""
        try:
            event = Event.from_record(record.topic, record.key, record.value, record.headers)
        except MalformedEventError as exc:
            return exc
        span.set_attribute("messaging.message.id", event.event_id)
        return event

    def _reject(self, record: Record, span: Span, malformed: MalformedEventError) -> None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(malformed)))
        self._dead_letter(record, malformed)

    def _settled(self, record: Record, span: Span, item: Event | MalformedEventError, outcome: str) -> None:
        """Report how the record was settled: its span's outcome and the consumer metrics."""
        span.set_attribute("gristmill.outcome", outcome)
        metrics = self.bus.metrics
        if metrics is None:
            return
        if outcome == HANDLED and isinstance(item, Event):
            lag = (datetime.now(UTC) - item.event_time).total_seconds()
            metrics.event_lag.labels(metrics.service, record.topic).set(max(lag, 0.0))
        metrics.events_handled.labels(metrics.service, record.topic, outcome).inc()

    def _handle(self, event: Event, handle: Handler) -> str:
        """Run the handler once per (group, event-id); raise ``_HandlerFailed`` if it raised."""
        database = self.bus.database
        assert database is not None  # checked by subscribe
        try:
            with database.transaction() as session:
                if is_handled(session, self.group_id, event.event_id):
                    log.info("skipping duplicate event %s on %s (group %s)", event.event_id, event.topic, self.group_id)
                    return DUPLICATE
                self._apply(session, (event,), lambda: handle(event, session))
        except _AlreadyHandled:
            return DUPLICATE
        return HANDLED

    def _handle_batch(self, events: Sequence[Event], batch: BatchHandler) -> list[str]:
        """Handle ``events`` in one transaction: drop those this group handled already (one query) or that repeat
        within the batch, call the handler once with the rest, mark them handled. Returns each event's outcome
        (``HANDLED`` or ``DUPLICATE``), in order; raises ``_HandlerFailed`` or ``_AlreadyHandled`` (nothing
        written)."""
        if not events:
            return []
        database = self.bus.database
        assert database is not None  # checked by subscribe
        outcomes: list[str] = []
        with database.transaction() as session:
            seen = handled_among(session, self.group_id, {event.event_id for event in events})
            fresh: list[Event] = []
            for event in events:
                if event.event_id in seen:
                    outcomes.append(DUPLICATE)
                else:
                    seen.add(event.event_id)
                    fresh.append(event)
                    outcomes.append(HANDLED)
            if len(fresh) < len(events):
                log.info(
                    "skipping %d duplicate events on %s (group %s)",
                    len(events) - len(fresh),
                    ",".join(self.topics),
                    self.group_id,
                )
            if fresh:
                self._apply(session, fresh, lambda: batch.handle(fresh, session))
        return outcomes

    def _apply(self, session: Session, events: Sequence[Event], call: Callable[[], None]) -> None:
        """Run ``call`` (the handler, writing through ``session``) and mark ``events`` handled in ``session``."""
        try:
            call()
            session.flush()
        except UnavailableError:
            # A dependency is down (object store, another service): the record is fine, so it is
            # retried after a backoff rather than dead-lettered.
            raise
        except Exception as exc:
            raise _HandlerFailed(exc) from exc
        try:
            mark_all_handled(session, self.group_id, [event.event_id for event in events])
        except IntegrityError:
            # Another member of the group handled it concurrently (a rebalance): undo ours.
            raise _AlreadyHandled from None

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

    def request_stop(self) -> None:
        """Ask the background loop to end after its current poll, without waiting (``stop`` waits, and closes)."""
        self._stopping.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the background loop (letting the current record finish) and close. Safe to call twice."""
        self.request_stop()
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


def _next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """The offset after the last of ``records`` in each partition: what to commit once they are settled."""
    return {(record.topic, record.partition): record.offset + 1 for record in records}


def _end_unsettled(spans: Sequence[Span], why: str) -> None:
    for span in spans:
        span.set_status(trace.Status(trace.StatusCode.ERROR, why))
        span.end()


def _nothing_to_wait_for() -> None:
    """The wait of a record written synchronously."""


def _first_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    first: dict[TopicPartition, int] = {}
    for record in records:
        first.setdefault((record.topic, record.partition), record.offset)
    return first
