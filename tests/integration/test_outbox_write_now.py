"""``Outbox.write_now``: events committed in a transaction of their own without a session (a call's usage before its
answer), on SQLite and on the real PostgreSQL server: the rows read back as the events, all or none of them, the
relay is woken at once, and the pooled connection is left as it was found (in transactions again)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gristmill.core.events import Event, EventCatalog, EventPublisher, Outbox, OutboxRelay, PublishOutcome
from gristmill.core.events.outbox import OutboxEvent
from gristmill.core.sql import Database

pytestmark = pytest.mark.integration

TOPIC = "gristmill.test.write-now.v1"


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.create_all()
    yield db
    db.dispose()


@pytest.fixture
def catalog() -> EventCatalog:
    catalog = EventCatalog()
    catalog.register(StringValue, TOPIC)
    return catalog


def _events(catalog: EventCatalog, *values: str) -> list[Event]:
    return [Event.create(StringValue(value=v), key=f"key-{v}", source="test", catalog=catalog) for v in values]


def _rows(database: Database) -> list[OutboxEvent]:
    with database.transaction() as session:
        return list(session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars())


def test_written_rows_read_back_as_the_events_in_order(database: Database, catalog: EventCatalog) -> None:
    events = _events(catalog, "a", "b", "c")
    Outbox.write_now(database, events)
    rows = _rows(database)
    assert [row.to_event() for row in rows] == events
    assert [(row.topic, row.published_at, row.attempts, row.last_error) for row in rows] == [(TOPIC, None, 0, None)] * 3
    Outbox.write_now(database, [])
    assert len(_rows(database)) == 3


def test_a_failed_write_writes_none_of_its_rows(database: Database, catalog: EventCatalog) -> None:
    (first,) = _events(catalog, "a")
    Outbox.write_now(database, [first])
    # The second event repeats the first one's id: the whole write is refused, its first row too.
    with pytest.raises(IntegrityError):
        Outbox.write_now(database, [*_events(catalog, "b"), first])
    assert [row.event_id for row in _rows(database)] == [first.event_id]


def test_the_pooled_connection_is_back_in_transactions(database: Database, catalog: EventCatalog) -> None:
    """The PostgreSQL path switches a pooled connection to autocommit for its statement: a session that uses the
    same connection afterwards must still roll back."""
    (first,) = _events(catalog, "a")
    with pytest.raises(IntegrityError):
        Outbox.write_now(database, [first, first])
    Outbox.write_now(database, [first])
    with pytest.raises(RuntimeError, match="rolled back"), database.transaction() as session:
        (second,) = _events(catalog, "b")
        Outbox.add(session, second)
        session.flush()
        raise RuntimeError("rolled back")
    assert [row.event_id for row in _rows(database)] == [first.event_id]


class _Recorder(EventPublisher):
    def __init__(self) -> None:
        self.published: list[Event] = []
        self.arrived = threading.Event()

    def publish(self, event: Event) -> None:
        self.publish_many([event])

    def publish_many(self, events: Sequence[Event]) -> PublishOutcome:
        self.published.extend(events)
        if events:
            self.arrived.set()
        return PublishOutcome(len(events))


def test_the_relay_is_woken_at_once(database: Database, catalog: EventCatalog) -> None:
    recorder = _Recorder()
    # A poll interval far longer than the wait below: only the write's wake-up can publish in time.
    with OutboxRelay(database, recorder, poll_interval_s=60):
        time.sleep(0.2)  # the relay's first look (nothing pending) is over; it now waits for a wake-up
        events = _events(catalog, "a", "b")
        Outbox.write_now(database, events)
        assert recorder.arrived.wait(10), "the relay was not woken by the write"
    assert recorder.published == events
    assert all(row.published_at is not None for row in _rows(database))
