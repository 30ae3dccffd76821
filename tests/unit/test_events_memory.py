"""The in-process event bus (the conformance suite), the envelope, the dedupe table, the outbox, batched
publishing and batch consumers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from gristmill.core.errors import (
    ConfigurationError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from gristmill.core.events import (
    BatchHandler,
    Event,
    EventCatalog,
    EventPublisher,
    MalformedEventError,
    MemoryBroker,
    MemoryEventBus,
    Outbox,
    OutboxEvent,
    OutboxRelay,
    PublishOutcome,
    Record,
    dead_letter_topic,
    handled_among,
    is_handled,
    validate_topic,
)
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.sql import Database
from tests.contracts.event_bus import EventBusContract, ReadRecords, poll_until

TOPIC = "gristmill.test.unit.v1"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'events.db'}")
    db.create_all()
    yield db
    db.dispose()


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(partitions=3)


@pytest.fixture
def catalog() -> EventCatalog:
    catalog = EventCatalog()
    catalog.register(StringValue, TOPIC)
    return catalog


class TestMemoryBus(EventBusContract):
    @pytest.fixture
    def publisher(
        self, broker: MemoryBroker, tracing: tuple[TracerProvider, InMemorySpanExporter]
    ) -> Iterator[MemoryEventBus]:
        with MemoryEventBus(broker, tracer_provider=tracing[0]) as bus:
            yield bus

    @pytest.fixture
    def subscriber(
        self, broker: MemoryBroker, database: Database, tracing: tuple[TracerProvider, InMemorySpanExporter]
    ) -> Iterator[MemoryEventBus]:
        with MemoryEventBus(broker, database=database, tracer_provider=tracing[0]) as bus:
            yield bus

    @pytest.fixture
    def read_records(self, broker: MemoryBroker) -> ReadRecords:
        def read(topic: str, count: int) -> list[Record]:
            records = broker.records(topic)
            assert len(records) == count, f"expected {count} records on {topic}, found {len(records)}"
            return records

        return read


# -- envelope -------------------------------------------------------------------------------------------------


def record_of(event: Event) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return event.key.encode(), event.payload, event.to_headers()


def test_headers_round_trip(catalog: EventCatalog) -> None:
    event = Event.create(StringValue(value="v"), key="job-1", source="training", catalog=catalog)
    assert [name for name, _ in event.to_headers()] == ["event-id", "event-type", "event-time", "source"]
    assert uuid.UUID(event.event_id).version == 4
    assert event.event_time.tzinfo is UTC
    key, value, headers = record_of(event)
    assert Event.from_record(TOPIC, key, value, headers) == event


def test_trace_context_is_captured_at_creation(catalog: EventCatalog) -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("work") as span:
        event = Event.create(StringValue(value="v"), key="job-1", source="training", catalog=catalog)
    names = dict(event.to_headers())
    assert names["traceparent"].decode().split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert Event.from_record(TOPIC, *record_of(event)).trace_headers == event.trace_headers


def test_event_time_is_rfc3339_utc_and_offsets_are_normalised(catalog: EventCatalog) -> None:
    when = datetime(2026, 1, 31, 13, 0, 0, 123456, tzinfo=UTC)
    event = Event.create(StringValue(), key="p1", source="labeling", catalog=catalog, event_time=when)
    assert dict(event.to_headers())["event-time"] == b"2026-01-31T13:00:00.123456Z"
    key, value, headers = record_of(event)
    headers = [(k, b"2026-01-31T14:00:00.123456+01:00" if k == "event-time" else v) for k, v in headers]
    assert Event.from_record(TOPIC, key, value, headers).event_time == when


def _replace_header(headers: list[tuple[str, bytes]], name: str, value: bytes | None) -> list[tuple[str, bytes]]:
    out = [(k, v) for k, v in headers if k != name]
    return out if value is None else [*out, (name, value)]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("event-id", None, "missing header event-id"),
        ("event-type", None, "missing header event-type"),
        ("event-time", None, "missing header event-time"),
        ("source", None, "missing header source"),
        ("event-id", b"", "missing header event-id"),
        ("event-id", b"not-a-uuid", "header event-id 'not-a-uuid' is not a UUID"),
        ("event-id", b"F2D1D1EB-5D5C-407D-BB77-B6CD091DAB0B", "canonical lower-case form"),
        ("event-time", b"yesterday", "header event-time 'yesterday' is not an RFC 3339 time"),
        ("event-time", b"2026-01-31T12:00:00", "is not an RFC 3339 time with an offset"),
        ("event-time", b"2026-01-31", "is not an RFC 3339 time"),
        ("event-type", b"not a type!", "header event-type 'not a type!' is not a protobuf message name"),
        ("source", b"Bad Source", "header source 'Bad Source' is not valid"),
        ("source", b"\xff\xfe", "header source is not UTF-8 text"),
    ],
)
def test_each_bad_header_is_named(catalog: EventCatalog, name: str, value: bytes | None, message: str) -> None:
    event = Event.create(StringValue(value="v"), key="job-1", source="training", catalog=catalog)
    key, payload, headers = record_of(event)
    with pytest.raises(MalformedEventError, match=message) as info:
        Event.from_record(TOPIC, key, payload, _replace_header(headers, name, value))
    assert isinstance(info.value, InvalidArgumentError)


def test_duplicate_header_key_and_missing_headers_are_named(catalog: EventCatalog) -> None:
    event = Event.create(StringValue(value="v"), key="job-1", source="training", catalog=catalog)
    key, payload, headers = record_of(event)
    with pytest.raises(MalformedEventError, match="header source appears more than once"):
        Event.from_record(TOPIC, key, payload, [*headers, ("source", b"other")])
    with pytest.raises(MalformedEventError, match="no key"):
        Event.from_record(TOPIC, None, payload, headers)
    with pytest.raises(MalformedEventError, match="record key is not a valid aggregate id"):
        Event.from_record(TOPIC, b"../x", payload, headers)
    with pytest.raises(MalformedEventError, match="missing header event-id, event-type, event-time, source"):
        Event.from_record(TOPIC, key, payload, [])


@pytest.mark.parametrize(
    "topic",
    ["", "jobs", "gristmill.training.v1", "gristmill.Training.job.v1", "gristmill.a.b.v0", "gristmill.a.b.c.v1",
     "gristmill.a.b.v1.dlq", "gristmill.a/b.c.v1", "x" * 300],
)  # fmt: skip
def test_bad_topic_names_are_refused(topic: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"topic .* is not valid"):
        validate_topic(topic)


def test_dead_letter_topic() -> None:
    assert dead_letter_topic("gristmill.training.job-state.v1") == "gristmill.training.job-state.v1.dlq"


def test_catalog_rules(catalog: EventCatalog) -> None:
    catalog.register(StringValue, TOPIC)  # the same pair again is fine
    with pytest.raises(InvalidArgumentError, match="already registered for topic"):
        catalog.register(StringValue, "gristmill.test.other.v1")
    with pytest.raises(InvalidArgumentError, match=r"already carries google\.protobuf\.StringValue"):
        catalog.register(Int64Value, TOPIC)
    with pytest.raises(InvalidArgumentError, match="Int64Value is not registered"):
        Event.create(Int64Value(value=1), key="k", source="s", catalog=catalog)
    event = Event.create(StringValue(value="v"), key="k", source="s", catalog=catalog)
    with pytest.raises(MalformedEventError, match=r"not a google\.protobuf\.Int64Value"):
        catalog.decode(event, Int64Value)
    with pytest.raises(InvalidArgumentError, match="event key"):
        Event.create(StringValue(value="v"), key="../etc", source="s", catalog=catalog)
    unknown = Event.from_record(TOPIC, *record_of(replace(event, event_type="gristmill.api.Nope")))
    with pytest.raises(MalformedEventError, match=r"unknown event-type 'gristmill\.api\.Nope'"):
        catalog.decode(unknown)


# -- consumer behaviour beyond the contract ---------------------------------------------------------------


def test_subscribing_needs_a_database(broker: MemoryBroker) -> None:
    with pytest.raises(ConfigurationError, match="no database"):
        MemoryEventBus(broker).subscribe([TOPIC], "g", lambda e, s: None)


def test_dead_letter_write_failure_leaves_the_record_uncommitted(
    broker: MemoryBroker, database: Database, catalog: EventCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = MemoryEventBus(broker, database=database)
    bad = Event.create(StringValue(value="bad"), key="k1", source="s", catalog=catalog)
    good = Event.create(StringValue(value="good"), key="k1", source="s", catalog=catalog)
    bus.publish(bad)
    bus.publish(good)
    seen: list[str] = []

    def handle(event: Event, _s: Session) -> None:
        if event.event_id == bad.event_id:
            raise RuntimeError("boom")
        seen.append(event.event_id)

    real_publish_record = bus.publish_record
    outage = True

    def flaky_publish_record(*args: object, **kwargs: object) -> None:
        if outage:
            raise UnavailableError("dead-letter topic unavailable")
        real_publish_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bus, "publish_record", flaky_publish_record)
    with bus.subscribe([TOPIC], "g", handle) as consumer:
        partition = broker.partition_for(b"k1")
        for _ in range(2):
            with pytest.raises(UnavailableError, match="dead-letter topic unavailable"):
                consumer.poll_once(0.1)
            assert broker.committed("g", TOPIC, partition) == 0
            assert seen == []
        outage = False
        assert consumer.poll_once(0.1) == 2
    assert seen == [good.event_id]
    assert broker.committed("g", TOPIC, partition) == 2
    assert len(broker.records(dead_letter_topic(TOPIC))) == 1


def test_unavailable_dependency_is_retried_not_dead_lettered(
    broker: MemoryBroker, database: Database, catalog: EventCatalog
) -> None:
    bus = MemoryEventBus(broker, database=database)
    event = Event.create(StringValue(value="x"), key="k1", source="s", catalog=catalog)
    bus.publish(event)
    attempts: list[str] = []

    def handle(e: Event, _s: Session) -> None:
        attempts.append(e.event_id)
        if len(attempts) < 3:
            raise UnavailableError("object store is down")

    with bus.subscribe([TOPIC], "g", handle) as consumer:
        partition = broker.partition_for(b"k1")
        for _ in range(2):
            with pytest.raises(UnavailableError, match="object store is down"):
                consumer.poll_once(0.1)
            assert broker.committed("g", TOPIC, partition) == 0
        assert consumer.poll_once(0.1) == 1
    assert attempts == [event.event_id] * 3
    assert broker.committed("g", TOPIC, partition) == 1
    assert broker.records(dead_letter_topic(TOPIC)) == []


def test_background_consumer_lifecycle_and_metrics(
    broker: MemoryBroker, database: Database, catalog: EventCatalog
) -> None:
    metrics = ServiceMetrics("unit")
    bus = MemoryEventBus(broker, database=database, metrics=metrics)
    events = [Event.create(StringValue(value=str(i)), key="k", source="s", catalog=catalog) for i in range(5)]
    got: list[str] = []
    done = threading.Event()

    def handle(event: Event, _s: Session) -> None:
        got.append(event.event_id)
        if len(got) == 5:
            done.set()

    consumer = bus.subscribe([TOPIC], "g", handle)
    with consumer.run_in_background():
        assert consumer.running
        with pytest.raises(FailedPreconditionError, match="runs in the background"):
            consumer.poll_once(0)
        for e in events:
            bus.publish(e)
        bus.publish(events[0])  # a duplicate
        assert done.wait(5), "the background consumer did not handle the events"
        deadline = time.monotonic() + 5
        while metrics.events_handled.labels("unit", TOPIC, "duplicate")._value.get() < 1:
            assert time.monotonic() < deadline, "the duplicate was not consumed"
            time.sleep(0.01)
    assert not consumer.running
    consumer.stop()  # twice is fine
    bus.close()
    bus.close()
    assert got == [e.event_id for e in events]
    assert metrics.events_published.labels("unit", TOPIC)._value.get() == 6
    assert metrics.events_handled.labels("unit", TOPIC, "handled")._value.get() == 5
    assert metrics.event_lag.labels("unit", TOPIC)._value.get() >= 0
    with pytest.raises(FailedPreconditionError, match="closed"):
        consumer.poll_once(0)


def test_one_consumer_per_partition_per_group(broker: MemoryBroker, database: Database, catalog: EventCatalog) -> None:
    bus = MemoryEventBus(broker, database=database)
    bus.publish(Event.create(StringValue(value="x"), key="k", source="s", catalog=catalog))
    first_got: list[str] = []
    second_got: list[str] = []
    first = bus.subscribe([TOPIC], "g", lambda e, s: first_got.append(e.event_id))
    second = bus.subscribe([TOPIC], "g", lambda e, s: second_got.append(e.event_id))
    assert first.poll_once(0) == 1
    assert second.poll_once(0) == 0, "a partition held by a live member is not shared"
    bus.publish(Event.create(StringValue(value="y"), key="k", source="s", catalog=catalog))
    first.stop()
    poll_until(second, lambda: len(second_got) == 1, "the second member to take over")
    second.stop()
    assert len(first_got) == 1 and len(second_got) == 1 and first_got != second_got


# -- outbox ---------------------------------------------------------------------------------------------------


class FlakyPublisher(EventPublisher):
    """Refuses the first ``failures`` publishes, then records what it publishes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.published: list[Event] = []

    def publish(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise UnavailableError("broker down (test)")
        self.published.append(event)


def _rows(database: Database) -> list[OutboxEvent]:
    with database.transaction() as session:
        return list(session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars())


def test_outbox_row_exists_only_once_the_transaction_commits(database: Database, catalog: EventCatalog) -> None:
    event = Event.create(StringValue(value="v"), key="job-1", source="training", catalog=catalog)
    with database.transaction() as session:
        Outbox.add(session, event)
        session.flush()
        assert _rows(database) == [], "another connection must not see an uncommitted outbox row"
    (row,) = _rows(database)
    assert (row.event_id, row.topic, row.key, row.published_at, row.attempts) == (
        event.event_id,
        TOPIC,
        "job-1",
        None,
        0,
    )
    assert row.to_event() == event


def test_outbox_rollback_writes_nothing(database: Database, catalog: EventCatalog) -> None:
    with pytest.raises(RuntimeError, match="state change failed"), database.transaction() as session:
        Outbox.add(session, Event.create(StringValue(value="v"), key="job-1", source="training", catalog=catalog))
        session.flush()
        raise RuntimeError("state change failed")
    assert _rows(database) == []


def test_relay_keeps_rows_through_failures_and_publishes_in_order(database: Database, catalog: EventCatalog) -> None:
    events = [Event.create(StringValue(value=str(i)), key=f"k{i % 2}", source="s", catalog=catalog) for i in range(5)]
    with database.transaction() as session:
        for e in events:
            Outbox.add(session, e)
    publisher = FlakyPublisher(failures=2)
    metrics = ServiceMetrics("unit")
    relay = OutboxRelay(database, publisher, batch_size=3, metrics=metrics)
    for attempt in (1, 2):
        with pytest.raises(UnavailableError, match="broker down"):
            relay.relay_once()
        rows = _rows(database)
        assert all(r.published_at is None for r in rows)
        assert (rows[0].attempts, rows[0].last_error) == (attempt, "broker down (test)")
        assert [r.attempts for r in rows[1:]] == [0, 0, 0, 0], "nothing after the failed row is tried"
        assert metrics.outbox_pending.labels("unit")._value.get() == 5
    assert relay.relay_once() == 3
    assert relay.relay_once() == 2
    assert relay.relay_once() == 0
    assert [e.event_id for e in publisher.published] == [e.event_id for e in events]
    assert publisher.published == events
    rows = _rows(database)
    assert all(r.published_at is not None and r.last_error is None for r in rows)
    assert metrics.outbox_pending.labels("unit")._value.get() == 0


def test_relay_stops_at_a_failure_mid_batch(database: Database, catalog: EventCatalog) -> None:
    events = [Event.create(StringValue(value=str(i)), key="k", source="s", catalog=catalog) for i in range(3)]
    with database.transaction() as session:
        for e in events:
            Outbox.add(session, e)

    class FailsSecond(FlakyPublisher):
        def publish(self, event: Event) -> None:
            self.calls += 1
            if self.calls == 2:
                raise UnavailableError("timeout")
            self.published.append(event)

    publisher = FailsSecond(failures=0)
    relay = OutboxRelay(database, publisher)
    with pytest.raises(UnavailableError):
        relay.relay_once()
    assert [r.published_at is not None for r in _rows(database)] == [True, False, False]
    assert relay.relay_once() == 2
    assert [e.event_id for e in publisher.published] == [e.event_id for e in events]


def test_relay_thread_retries_with_backoff_and_stops_twice(database: Database, catalog: EventCatalog) -> None:
    publisher = FlakyPublisher(failures=3)
    relay = OutboxRelay(database, publisher, poll_interval_s=0.01, retry_backoff_s=0.01, max_backoff_s=0.05)
    with relay:
        assert relay.running
        event = Event.create(StringValue(value="v"), key="k", source="s", catalog=catalog)
        with database.transaction() as session:
            Outbox.add(session, event)
        deadline = time.monotonic() + 5
        while not publisher.published:
            assert time.monotonic() < deadline, "the relay did not publish after the failures"
            time.sleep(0.01)
    relay.stop()
    assert not relay.running
    assert publisher.calls == 4
    assert publisher.published == [event]
    assert _rows(database)[0].attempts == 4


def test_relay_thread_wakes_on_the_commit_that_added_rows_not_on_its_poll(
    database: Database, catalog: EventCatalog
) -> None:
    publisher = FlakyPublisher(failures=0)
    relay = OutboxRelay(database, publisher, poll_interval_s=60)
    reads: list[int] = []
    relay_once = relay.relay_once

    def counted() -> int:
        reads.append(1)
        return relay_once()

    relay.relay_once = counted  # type: ignore[method-assign]
    with relay:
        deadline = time.monotonic() + 5
        while not reads:
            assert time.monotonic() < deadline, "the relay never read the outbox"
            time.sleep(0.01)
        with database.transaction() as session:  # a commit without outbox rows does not wake it
            session.execute(select(OutboxEvent.id))
        event = Event.create(StringValue(value="v"), key="k", source="s", catalog=catalog)
        with pytest.raises(RuntimeError), database.transaction() as session:
            Outbox.add(session, event)
            raise RuntimeError("rolled back")
        time.sleep(0.2)
        assert len(reads) == 1 and publisher.published == []
        began = time.monotonic()
        with database.transaction() as session:
            Outbox.add(session, event)
        while not publisher.published:
            assert time.monotonic() - began < 5, "a committed row waited for the 60 s poll"
            time.sleep(0.01)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5, "stop waited out the poll interval"
    assert publisher.published == [event]
    assert len(reads) == 2


def test_a_lingering_relay_publishes_a_trickle_of_commits_as_one_batch(
    database: Database, catalog: EventCatalog
) -> None:
    publisher = FlakyPublisher(failures=0)
    relay = OutboxRelay(database, publisher, poll_interval_s=60, linger_s=0.5)
    batches: list[int] = []
    relay_once = relay.relay_once

    def counted() -> int:
        published = relay_once()
        batches.append(published)
        return published

    relay.relay_once = counted  # type: ignore[method-assign]
    with relay:
        deadline = time.monotonic() + 5
        while not batches:  # the first read at start finds nothing
            assert time.monotonic() < deadline, "the relay never read the outbox"
            time.sleep(0.01)
        began = time.monotonic()
        events = [Event.create(StringValue(value=str(i)), key="k", source="s", catalog=catalog) for i in range(5)]
        for event in events:  # five commits, 20 ms apart, as five requests would make
            with database.transaction() as session:
                Outbox.add(session, event)
            time.sleep(0.02)
        while len(publisher.published) < 5:
            assert time.monotonic() - began < 5, "the lingering relay never published"
            time.sleep(0.01)
        took = time.monotonic() - began
    assert publisher.published == events
    assert batches[1:] == [5], "the five commits were not published as one batch"
    assert took >= 0.5


def test_relayed_events_reach_a_consumer_through_the_memory_bus(
    broker: MemoryBroker, database: Database, catalog: EventCatalog
) -> None:
    bus = MemoryEventBus(broker, database=database)
    sent = [Event.create(StringValue(value=str(i)), key="k", source="s", catalog=catalog) for i in range(3)]
    with database.transaction() as session:
        for e in sent:
            Outbox.add(session, e)
    assert OutboxRelay(database, bus).drain(timeout_s=5) == 3
    got: list[Event] = []
    with bus.subscribe([TOPIC], "g", lambda e, s: got.append(e)) as consumer:
        poll_until(consumer, lambda: len(got) == 3, "the relayed events")
    assert [(e.event_id, e.payload, e.event_time) for e in got] == [(e.event_id, e.payload, e.event_time) for e in sent]


# -- batched publishing -----------------------------------------------------------------------------------------


class BatchPublisher(EventPublisher):
    """Takes every event of a batch (as a broker might) but confirms only those before ``fail_at``, once."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.batches: list[list[Event]] = []
        self.taken: list[Event] = []

    def publish(self, event: Event) -> None:
        raise AssertionError("the relay publishes through publish_many")

    def publish_many(self, events: Sequence[Event]) -> PublishOutcome:
        self.batches.append(list(events))
        self.taken.extend(events)
        fail_at, self.fail_at = self.fail_at, None
        if fail_at is not None and fail_at < len(events):
            return PublishOutcome(fail_at, UnavailableError(f"record {fail_at} timed out (test)"))
        return PublishOutcome(len(events))


def test_relay_marks_exactly_the_confirmed_prefix_of_a_batch(database: Database, catalog: EventCatalog) -> None:
    events = [Event.create(StringValue(value=str(i)), key=f"k{i % 2}", source="s", catalog=catalog) for i in range(6)]
    with database.transaction() as session:
        for e in events:
            Outbox.add(session, e)
    publisher = BatchPublisher(fail_at=2)
    relay = OutboxRelay(database, publisher)
    assert relay.batch_size == 500
    with pytest.raises(UnavailableError, match="record 2 timed out"):
        relay.relay_once()
    assert publisher.batches == [events], "one batch for all pending rows"
    rows = _rows(database)
    assert [r.published_at is not None for r in rows] == [True, True, False, False, False, False]
    assert [(r.attempts, r.last_error) for r in rows[2:]] == [
        (1, "record 2 timed out (test)"),
        (0, None),
        (0, None),
        (0, None),
    ], "only the first refused row is charged; the rows after it stay pending even though the broker took them"
    assert relay.consecutive_failures == 1
    assert relay.relay_once() == 4
    assert publisher.batches[1] == events[2:], "the failed row and everything after it, again, in order"
    assert all(r.published_at is not None and r.last_error is None for r in _rows(database))
    assert relay.relay_once() == 0
    assert relay.consecutive_failures == 0


def test_bus_publish_many_reports_the_confirmed_prefix_with_a_span_and_a_count_each(
    broker: MemoryBroker,
    catalog: EventCatalog,
    tracing: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, exporter = tracing
    metrics = ServiceMetrics("unit")
    bus = MemoryEventBus(broker, tracer_provider=provider, metrics=metrics)
    events = [Event.create(StringValue(value=str(i)), key="k", source="s", catalog=catalog) for i in range(5)]
    assert bus.publish_many(events[:2]) == PublishOutcome(2)
    writes = 0
    real_publish_record = bus.publish_record

    def fails_second(*args: object) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise UnavailableError("broker down (test)")
        real_publish_record(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(bus, "publish_record", fails_second)
    outcome = bus.publish_many(events[2:])
    assert outcome.confirmed == 1
    assert isinstance(outcome.error, UnavailableError)
    assert writes == 2, "the memory bus writes one by one and stops at the failure"
    assert [r.headers[0][1].decode() for r in broker.records(TOPIC)] == [e.event_id for e in events[:3]]
    assert metrics.events_published.labels("unit", TOPIC)._value.get() == 3
    spans = sorted(
        (s for s in exporter.get_finished_spans() if s.name == f"{TOPIC} publish"), key=lambda s: s.start_time or 0
    )
    assert [s.attributes["messaging.message.id"] for s in spans if s.attributes] == [e.event_id for e in events[:4]]
    assert [s.status.status_code.name for s in spans] == ["UNSET", "UNSET", "UNSET", "ERROR"]
    # Each record carries its own producer span as the parent of the consumer's.
    for span, record in zip(spans, broker.records(TOPIC), strict=False):
        assert span.context is not None
        assert f"{span.context.span_id:016x}".encode() in dict(record.headers)["traceparent"]
    # A bad event in a batch is a failure at its place, like a refused one.
    monkeypatch.setattr(bus, "publish_record", real_publish_record)
    bad = replace(events[4], key="")
    outcome = bus.publish_many([events[3], bad, events[4]])
    assert outcome.confirmed == 1 and isinstance(outcome.error, InvalidArgumentError)


# -- batch consumers --------------------------------------------------------------------------------------------


class Batches:
    """A batch handler that records its calls and writes one outbox row per event (state that rolls back)."""

    def __init__(self, catalog: EventCatalog, *, fail_on: str = "", unavailable: int = 0) -> None:
        self.catalog = catalog
        self.fail_on = fail_on
        self.unavailable = unavailable
        self.calls: list[list[str]] = []

    def handle(self, events: Sequence[Event], session: Session) -> None:
        values = [self.catalog.decode(e, StringValue).value for e in events]
        self.calls.append(values)
        if self.unavailable:
            self.unavailable -= 1
            raise UnavailableError("database of a dependency is down (test)")
        for value in values:
            Outbox.add(
                session, Event.create(StringValue(value=f"saw {value}"), key="r", source="s", catalog=self.catalog)
            )
        if self.fail_on in values:
            raise ValueError(f"cannot handle {self.fail_on}")

    def handler(self) -> BatchHandler:
        return BatchHandler(self.handle)


def _reactions(database: Database) -> list[str]:
    return sorted(StringValue.FromString(r.payload).value for r in _rows(database))


def _malformed(bus: MemoryEventBus, catalog: EventCatalog, key: str) -> None:
    template = Event.create(StringValue(value="no id"), key=key, source="s", catalog=catalog)
    headers = [(k, v) for k, v in template.to_headers() if k != "event-id"]
    bus.publish_record(TOPIC, key.encode(), template.payload, headers)


def _handled_count(metrics: ServiceMetrics, outcome: str) -> float:
    return float(metrics.events_handled.labels("unit", TOPIC, outcome)._value.get())


def test_batch_handler_handles_a_fetched_batch_in_one_transaction(
    broker: MemoryBroker,
    database: Database,
    catalog: EventCatalog,
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    metrics = ServiceMetrics("unit")
    bus = MemoryEventBus(broker, database=database, tracer_provider=provider, metrics=metrics)
    events = [Event.create(StringValue(value=str(i)), key=f"k{i % 4}", source="s", catalog=catalog) for i in range(20)]
    assert bus.publish_many(events).confirmed == 20
    batches = Batches(catalog)
    commits: list[int] = []
    stop_counting = database.on_commit(lambda _session: commits.append(1))
    with bus.subscribe([TOPIC], "g", batches.handler()) as consumer:
        assert consumer.poll_once(0.1) == 20
        stop_counting()
        assert consumer.poll_once(0) == 0
    assert len(batches.calls) == 1 and sorted(batches.calls[0]) == sorted(str(i) for i in range(20))
    assert len(commits) == 1, "the whole batch is one transaction"
    assert _reactions(database) == sorted(f"saw {i}" for i in range(20))
    with database.transaction() as session:
        assert handled_among(session, "g", {e.event_id for e in events}) == {e.event_id for e in events}
    assert sum(broker.committed("g", TOPIC, p) for p in range(3)) == 20
    assert _handled_count(metrics, "handled") == 20
    process = [s for s in exporter.get_finished_spans() if s.name == f"{TOPIC} process"]
    assert len(process) == 20
    assert all(s.attributes and s.attributes["gristmill.outcome"] == "handled" for s in process)
    # Each record's span still continues its producer's trace.
    publish = {
        s.attributes["messaging.message.id"]: s
        for s in exporter.get_finished_spans()
        if s.kind.name == "PRODUCER" and s.attributes
    }
    for span in process:
        assert span.attributes is not None and span.parent is not None
        producer = publish[span.attributes["messaging.message.id"]]
        assert producer.context is not None and span.parent.span_id == producer.context.span_id


def test_batch_handler_gets_no_event_twice(
    broker: MemoryBroker, database: Database, catalog: EventCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = ServiceMetrics("unit")
    bus = MemoryEventBus(broker, database=database, metrics=metrics)
    a, b, c = (Event.create(StringValue(value=v), key="k", source="s", catalog=catalog) for v in "abc")
    batches = Batches(catalog)
    with bus.subscribe([TOPIC], "g", batches.handler()) as consumer:
        bus.publish_many([a, b])
        assert consumer.poll_once(0.1) == 2
        bus.publish_many([a, c, c, b])  # redeliveries of a and b, and c twice in one batch
        queries: list[str] = []

        def count_handled_queries(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            if "gristmill_handled_events" in statement and statement.lstrip().upper().startswith("SELECT"):
                queries.append(statement)

        sa_event.listen(database.engine, "before_cursor_execute", count_handled_queries)
        try:
            assert consumer.poll_once(0.1) == 4
        finally:
            sa_event.remove(database.engine, "before_cursor_execute", count_handled_queries)
    assert batches.calls == [["a", "b"], ["c"]]
    assert len(queries) == 1, "one query finds the handled events of a whole batch"
    assert _reactions(database) == ["saw a", "saw b", "saw c"]
    assert (_handled_count(metrics, "handled"), _handled_count(metrics, "duplicate")) == (3, 3)


def test_one_bad_event_of_a_batch_is_dead_lettered_alone_and_the_others_counted_once(
    broker: MemoryBroker, database: Database, catalog: EventCatalog
) -> None:
    metrics = ServiceMetrics("unit")
    bus = MemoryEventBus(broker, database=database, metrics=metrics)
    bus.publish_many([Event.create(StringValue(value=v), key="k", source="s", catalog=catalog) for v in ("1", "2")])
    bad = Event.create(StringValue(value="bad"), key="k", source="s", catalog=catalog)
    bus.publish(bad)
    _malformed(bus, catalog, "k")
    bus.publish(Event.create(StringValue(value="3"), key="k", source="s", catalog=catalog))
    batches = Batches(catalog, fail_on="bad")
    with bus.subscribe([TOPIC], "g", batches.handler()) as consumer:
        assert consumer.poll_once(0.1) == 5
    # The batch failed as a whole, then each event was handled alone.
    assert batches.calls == [["1", "2", "bad", "3"], ["1"], ["2"], ["bad"], ["3"]]
    assert _reactions(database) == ["saw 1", "saw 2", "saw 3"], "the failed batch wrote nothing"
    dead = broker.records(dead_letter_topic(TOPIC))
    assert [dict(r.headers)["error-type"] for r in dead] == [b"ValueError", b"MalformedEventError"]
    assert dict(dead[0].headers)["event-id"] == bad.event_id.encode()
    assert broker.committed("g", TOPIC, broker.partition_for(b"k")) == 5
    assert (_handled_count(metrics, "handled"), _handled_count(metrics, "dead_lettered")) == (3, 2)
    with database.transaction() as session:
        assert not is_handled(session, "g", bad.event_id)


def test_unavailable_rewinds_the_whole_batch_and_retries_it(
    broker: MemoryBroker, database: Database, catalog: EventCatalog
) -> None:
    bus = MemoryEventBus(broker, database=database)
    bus.publish(Event.create(StringValue(value="1"), key="k", source="s", catalog=catalog))
    _malformed(bus, catalog, "k")
    bus.publish(Event.create(StringValue(value="2"), key="k", source="s", catalog=catalog))
    batches = Batches(catalog, unavailable=2)
    partition = broker.partition_for(b"k")
    with bus.subscribe([TOPIC], "g", batches.handler()) as consumer:
        for _ in range(2):
            with pytest.raises(UnavailableError, match="is down"):
                consumer.poll_once(0.1)
            assert broker.committed("g", TOPIC, partition) == 0
            assert broker.records(dead_letter_topic(TOPIC)) == [], "nothing of the batch is settled"
            assert _rows(database) == []
        assert consumer.poll_once(0.1) == 3
    assert batches.calls == [["1", "2"]] * 3
    assert _reactions(database) == ["saw 1", "saw 2"]
    assert len(broker.records(dead_letter_topic(TOPIC))) == 1
    assert broker.committed("g", TOPIC, partition) == 3


def test_a_failed_dead_letter_in_a_batch_stops_at_that_record(
    broker: MemoryBroker, database: Database, catalog: EventCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = ServiceMetrics("unit")
    bus = MemoryEventBus(broker, database=database, metrics=metrics)
    bus.publish(Event.create(StringValue(value="1"), key="k", source="s", catalog=catalog))
    _malformed(bus, catalog, "k")
    bus.publish(Event.create(StringValue(value="2"), key="k", source="s", catalog=catalog))
    real_publish_record = bus.publish_record
    outage = True

    def flaky_publish_record(*args: object) -> None:
        if outage:
            raise UnavailableError("dead-letter topic unavailable")
        real_publish_record(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(bus, "publish_record", flaky_publish_record)
    batches = Batches(catalog)
    partition = broker.partition_for(b"k")
    with bus.subscribe([TOPIC], "g", batches.handler()) as consumer:
        with pytest.raises(UnavailableError, match="dead-letter topic unavailable"):
            consumer.poll_once(0.1)
        assert broker.committed("g", TOPIC, partition) == 1, "committed up to the record that could not be settled"
        outage = False
        assert consumer.poll_once(0.1) == 2
    assert batches.calls == [["1", "2"]], "the event after it was handled already and is skipped when fetched again"
    assert _reactions(database) == ["saw 1", "saw 2"]
    assert len(broker.records(dead_letter_topic(TOPIC))) == 1
    assert broker.committed("g", TOPIC, partition) == 3
    assert [_handled_count(metrics, o) for o in ("handled", "duplicate", "dead_lettered")] == [2, 1, 1]
