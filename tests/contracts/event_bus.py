"""One conformance suite for every ``EventBus`` implementation.

Subclasses provide these fixtures:

- ``publisher``: an ``EventBus`` that the test publishes with;
- ``subscriber``: an ``EventBus`` with a database, that the test consumes with (it may be another instance
  over the same transport, as two services would be);
- ``read_records``: ``(topic, count) -> list[Record]``, the raw records of a topic (waiting until there are
  ``count``), to look at dead letters without going through a consumer.

Both buses must use the ``tracing`` fixture's provider. Each test gets its own topic and consumer group.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gristmill.core.events import (
    BatchHandler,
    Consumer,
    Event,
    EventBus,
    EventCatalog,
    Outbox,
    OutboxEvent,
    PublishOutcome,
    Record,
    dead_letter_topic,
    handled_among,
    is_handled,
)
from gristmill.core.ids import new_id
from gristmill.core.telemetry import current_trace_id

ReadRecords = Callable[[str, int], list[Record]]
POLL_S = 0.2


def poll_until(consumer: Consumer, done: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        consumer.poll_once(POLL_S)


def headers_of(record: Record) -> dict[str, bytes]:
    return dict(record.headers)


class EventBusContract:
    @pytest.fixture
    def topic(self) -> str:
        return f"gristmill.test.e{uuid.uuid4().hex[:16]}.v1"

    @pytest.fixture
    def group(self) -> str:
        return f"group-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def catalog(self, topic: str) -> EventCatalog:
        catalog = EventCatalog()
        catalog.register(StringValue, topic)
        return catalog

    @staticmethod
    def event(catalog: EventCatalog, text: str, key: str) -> Event:
        return Event.create(StringValue(value=text), key=key, source="contract-test", catalog=catalog)

    # -- round trip -----------------------------------------------------------------------------------------

    def test_round_trip_keeps_key_headers_and_payload(
        self,
        publisher: EventBus,
        subscriber: EventBus,
        read_records: ReadRecords,
        catalog: EventCatalog,
        topic: str,
        group: str,
    ) -> None:
        key = new_id()
        sent = self.event(catalog, "hello", key)
        publisher.publish(sent)
        received: list[Event] = []
        with subscriber.subscribe([topic], group, lambda e, _s: received.append(e)) as consumer:
            poll_until(consumer, lambda: len(received) == 1, "the event")
        got = received[0]
        assert (got.event_id, got.event_type, got.topic, got.key, got.source, got.event_time) == (
            sent.event_id,
            "google.protobuf.StringValue",
            topic,
            key,
            "contract-test",
            sent.event_time,
        )
        assert catalog.decode(got, StringValue).value == "hello"
        (record,) = read_records(topic, 1)
        assert record.key == key.encode()
        assert record.value == sent.payload
        names = [name for name, _ in record.headers]
        assert names[:4] == ["event-id", "event-type", "event-time", "source"]
        assert "traceparent" in names
        assert headers_of(record)["event-id"] == sent.event_id.encode()
        assert headers_of(record)["event-time"].endswith(b"Z")

    def test_events_of_one_key_arrive_in_order(
        self, publisher: EventBus, subscriber: EventBus, catalog: EventCatalog, topic: str, group: str
    ) -> None:
        keys = [new_id() for _ in range(3)]
        for i in range(10):
            for key in keys:
                publisher.publish(self.event(catalog, f"{key}:{i}", key))
        seen: dict[str, list[int]] = {key: [] for key in keys}

        def handle(event: Event, _session: Session) -> None:
            key, _, i = catalog.decode(event, StringValue).value.partition(":")
            assert key == event.key
            seen[key].append(int(i))

        with subscriber.subscribe([topic], group, handle) as consumer:
            poll_until(consumer, lambda: sum(map(len, seen.values())) == 30, "30 events")
        assert seen == {key: list(range(10)) for key in keys}

    # -- consumer groups ------------------------------------------------------------------------------------

    def test_committed_offsets_belong_to_the_group(
        self, publisher: EventBus, subscriber: EventBus, catalog: EventCatalog, topic: str, group: str
    ) -> None:
        key = new_id()
        first = [self.event(catalog, f"old-{i}", key) for i in range(3)]
        for e in first:
            publisher.publish(e)
        got_a: list[str] = []
        with subscriber.subscribe([topic], group, lambda e, _s: got_a.append(e.event_id)) as consumer_a:
            poll_until(consumer_a, lambda: len(got_a) == 3, "the first three events")
        assert got_a == [e.event_id for e in first]

        later = self.event(catalog, "new", key)
        publisher.publish(later)
        got_b: list[str] = []
        with subscriber.subscribe([topic], group, lambda e, _s: got_b.append(e.event_id)) as consumer_b:
            poll_until(consumer_b, lambda: later.event_id in got_b, "the new event in the same group")
            consumer_b.poll_once(POLL_S)
        assert got_b == [later.event_id], "a consumer of the same group must resume after the committed offset"

        got_c: list[str] = []
        with subscriber.subscribe([topic], f"{group}-other", lambda e, _s: got_c.append(e.event_id)) as consumer_c:
            poll_until(consumer_c, lambda: len(got_c) == 4, "every event in a new group")
        assert got_c == [e.event_id for e in [*first, later]]

    def test_duplicate_event_id_is_handled_once_even_after_a_restart(
        self, publisher: EventBus, subscriber: EventBus, catalog: EventCatalog, topic: str, group: str
    ) -> None:
        key = new_id()
        once = self.event(catalog, "once", key)
        after = self.event(catalog, "after", key)
        for e in (once, once, after):
            publisher.publish(e)
        handled: list[str] = []
        with subscriber.subscribe([topic], group, lambda e, _s: handled.append(e.event_id)) as consumer:
            poll_until(consumer, lambda: after.event_id in handled, "the event after the duplicate")
        assert handled == [once.event_id, after.event_id]

        # A redelivery to a new consumer of the group (as after a crash before the commit) is still skipped:
        # the handled ids are in the database, not in the consumer.
        marker = self.event(catalog, "marker", key)
        publisher.publish(once)
        publisher.publish(marker)
        with subscriber.subscribe([topic], group, lambda e, _s: handled.append(e.event_id)) as consumer:
            poll_until(consumer, lambda: marker.event_id in handled, "the marker after the redelivery")
        assert handled == [once.event_id, after.event_id, marker.event_id]
        assert subscriber.database is not None
        with subscriber.database.transaction() as session:
            assert is_handled(session, group, once.event_id)
            assert not is_handled(session, f"{group}-other", once.event_id)

    # -- dead letters ---------------------------------------------------------------------------------------

    def test_handler_exception_dead_letters_the_record_and_moves_on(
        self,
        publisher: EventBus,
        subscriber: EventBus,
        read_records: ReadRecords,
        catalog: EventCatalog,
        topic: str,
        group: str,
    ) -> None:
        key = new_id()
        bad = self.event(catalog, "explode", key)
        good = self.event(catalog, "fine", key)
        publisher.publish(bad)
        publisher.publish(good)
        handled: list[str] = []

        def handle(event: Event, session: Session) -> None:
            # The handler's own write shares the transaction that marks the event handled ...
            Outbox.add(session, self.event(catalog, f"reaction to {event.event_id}", key))
            if catalog.decode(event, StringValue).value == "explode":
                raise ValueError("cannot handle this\nsecond line")
            handled.append(event.event_id)

        with subscriber.subscribe([topic], group, handle) as consumer:
            poll_until(consumer, lambda: good.event_id in handled, "the event after the failing one")
        assert handled == [good.event_id]

        (dead,) = read_records(dead_letter_topic(topic), 1)
        assert dead.key == key.encode()
        assert dead.value == bad.payload
        headers = headers_of(dead)
        assert headers["error"] == b"cannot handle this second line"
        assert headers["error-type"] == b"ValueError"
        assert headers["event-id"] == bad.event_id.encode()
        assert headers["event-type"] == b"google.protobuf.StringValue"

        # ... so the failure rolled the write back with the mark: one reaction row, for the good event only.
        assert subscriber.database is not None
        with subscriber.database.transaction() as session:
            assert not is_handled(session, group, bad.event_id)
            assert is_handled(session, group, good.event_id)
            assert session.execute(select(func.count()).select_from(OutboxEvent)).scalar_one() == 1

    def test_record_without_event_id_is_dead_lettered_with_the_reason(
        self,
        publisher: EventBus,
        subscriber: EventBus,
        read_records: ReadRecords,
        catalog: EventCatalog,
        topic: str,
        group: str,
    ) -> None:
        key = new_id()
        template = self.event(catalog, "no id", key)
        headers = [(k, v) for k, v in template.to_headers() if k != "event-id"]
        publisher.publish_record(topic, key.encode(), template.payload, headers)
        good = self.event(catalog, "fine", key)
        publisher.publish(good)
        handled: list[str] = []
        with subscriber.subscribe([topic], group, lambda e, _s: handled.append(e.event_id)) as consumer:
            poll_until(consumer, lambda: good.event_id in handled, "the event after the malformed record")
        assert handled == [good.event_id]
        (dead,) = read_records(dead_letter_topic(topic), 1)
        assert dead.value == template.payload
        assert headers_of(dead)["error-type"] == b"MalformedEventError"
        assert b"missing header event-id" in headers_of(dead)["error"]
        assert headers_of(dead)["source"] == b"contract-test", "the original headers are kept"

    def test_undecodable_payload_is_dead_lettered_with_the_reason(
        self,
        publisher: EventBus,
        subscriber: EventBus,
        read_records: ReadRecords,
        catalog: EventCatalog,
        topic: str,
        group: str,
    ) -> None:
        key = new_id()
        truncated = b"\x0a\x05ab"  # field 1, length 5, but only two bytes follow
        broken = replace(self.event(catalog, "x", key), payload=truncated)
        good = self.event(catalog, "fine", key)
        publisher.publish(broken)
        publisher.publish(good)
        values: list[str] = []
        with subscriber.subscribe(
            [topic], group, lambda e, _s: values.append(catalog.decode(e, StringValue).value)
        ) as consumer:
            poll_until(consumer, lambda: values == ["fine"], "the event after the undecodable one")
        (dead,) = read_records(dead_letter_topic(topic), 1)
        assert dead.value == truncated
        assert headers_of(dead)["error-type"] == b"MalformedEventError"
        assert b"could not be decoded as google.protobuf.StringValue" in headers_of(dead)["error"]
        assert headers_of(dead)["event-id"] == broken.event_id.encode()

    # -- batches --------------------------------------------------------------------------------------------

    def test_publish_many_delivers_a_batch_in_order_with_a_producer_span_each(
        self,
        publisher: EventBus,
        read_records: ReadRecords,
        tracing: tuple[TracerProvider, InMemorySpanExporter],
        catalog: EventCatalog,
        topic: str,
    ) -> None:
        keys = [new_id() for _ in range(3)]
        events = [self.event(catalog, str(i), keys[i % 3]) for i in range(60)]
        assert publisher.publish_many(events) == PublishOutcome(60)
        records = read_records(topic, 60)
        for key in keys:
            got = [headers_of(r)["event-id"].decode() for r in records if r.key == key.encode()]
            assert got == [e.event_id for e in events if e.key == key], "one key's events arrive in order"
        spans = {
            s.attributes["messaging.message.id"]: s
            for s in tracing[1].get_finished_spans()
            if s.name == f"{topic} publish" and s.attributes
        }
        assert len(spans) == 60
        for record in records:
            span = spans[headers_of(record)["event-id"].decode()]
            assert span.context is not None and span.status.is_ok
            assert f"{span.context.span_id:016x}".encode() in headers_of(record)["traceparent"]

    def test_batch_handler_counts_each_event_once_and_dead_letters_a_bad_one_alone(
        self,
        publisher: EventBus,
        subscriber: EventBus,
        read_records: ReadRecords,
        catalog: EventCatalog,
        topic: str,
        group: str,
    ) -> None:
        key = new_id()
        good = [self.event(catalog, f"good {i}", key) for i in range(20)]
        bad = self.event(catalog, "explode", key)
        assert publisher.publish_many([*good[:10], bad, good[0], *good[10:]]).error is None
        sizes: list[int] = []

        def handle(events: Sequence[Event], session: Session) -> None:
            sizes.append(len(events))
            for event in events:
                Outbox.add(session, self.event(catalog, f"reaction to {event.event_id}", key))
            if any(catalog.decode(e, StringValue).value == "explode" for e in events):
                raise ValueError("cannot handle this")

        database = subscriber.database
        assert database is not None
        ids = {e.event_id for e in good}

        def all_handled() -> bool:
            with database.transaction() as session:
                return handled_among(session, group, ids) == ids

        with subscriber.subscribe([topic], group, BatchHandler(handle)) as consumer:
            poll_until(consumer, all_handled, "the good events")
        assert max(sizes) > 1, "the handler got batches"
        (dead,) = read_records(dead_letter_topic(topic), 1)
        assert headers_of(dead)["event-id"] == bad.event_id.encode()
        assert headers_of(dead)["error-type"] == b"ValueError"
        with database.transaction() as session:
            reactions = [
                StringValue.FromString(p).value for p in session.execute(select(OutboxEvent.payload)).scalars()
            ]
            assert not is_handled(session, group, bad.event_id)
        assert sorted(reactions) == sorted(f"reaction to {e.event_id}" for e in good), "each good event counted once"

    # -- tracing --------------------------------------------------------------------------------------------

    def test_trace_continues_across_the_hop(
        self,
        publisher: EventBus,
        subscriber: EventBus,
        tracing: tuple[TracerProvider, InMemorySpanExporter],
        catalog: EventCatalog,
        topic: str,
        group: str,
    ) -> None:
        provider, exporter = tracing
        with provider.get_tracer("test").start_as_current_span("client call") as outer:
            event = self.event(catalog, "traced", new_id())
        outer_ctx = outer.get_span_context()
        # Published later, outside the span, as the outbox relay does: the event carries the context.
        publisher.publish(event)
        trace_ids_in_handler: list[str] = []
        with subscriber.subscribe([topic], group, lambda e, _s: trace_ids_in_handler.append(current_trace_id())) as c:
            poll_until(c, lambda: len(trace_ids_in_handler) == 1, "the traced event")

        spans: dict[str, ReadableSpan] = {s.name: s for s in exporter.get_finished_spans()}
        produce, process = spans[f"{topic} publish"], spans[f"{topic} process"]
        assert produce.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
        assert produce.context is not None and process.context is not None
        assert produce.context.trace_id == outer_ctx.trace_id
        assert process.context.trace_id == outer_ctx.trace_id
        assert produce.parent is not None and produce.parent.span_id == outer_ctx.span_id
        assert process.parent is not None and process.parent.span_id == produce.context.span_id
        assert process.attributes is not None
        assert process.attributes["messaging.message.id"] == event.event_id
        assert process.attributes["messaging.consumer.group.name"] == group
        assert trace_ids_in_handler == [format(outer_ctx.trace_id, "032x")]
