"""Two outbox relays on one PostgreSQL database (serving replicas sharing their store): they take turns under
the outbox's advisory lock, so every event is published exactly once and each key's events stay in order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from gristmill.core.events import Event, EventCatalog, EventPublisher, Outbox, OutboxRelay, PublishOutcome
from gristmill.core.sql import Database
from tests.support.databases import fresh_postgres_database

pytestmark = pytest.mark.integration


class SlowRecorder(EventPublisher):
    """Records what it publishes, taking a few milliseconds per batch (a broker round trip), so that two relays
    overlap."""

    def __init__(self, name: str, log: list[tuple[str, Event]], lock: threading.Lock) -> None:
        self.name = name
        self.log = log
        self.lock = lock

    def publish(self, event: Event) -> None:
        self.publish_many([event])

    def publish_many(self, events: Sequence[Event]) -> PublishOutcome:
        time.sleep(0.005)
        with self.lock:
            self.log.extend((self.name, event) for event in events)
        return PublishOutcome(len(events))


@pytest.fixture
def database() -> Iterator[Database]:
    for url in fresh_postgres_database():
        db = Database(url)
        db.create_all()
        yield db
        db.dispose()


def test_two_relays_on_one_database_publish_each_event_once_in_order(database: Database) -> None:
    catalog = EventCatalog()
    catalog.register(StringValue, "gristmill.test.shared-outbox.v1")
    log: list[tuple[str, Event]] = []
    lock = threading.Lock()
    relays = [OutboxRelay(database, SlowRecorder(name, log, lock), batch_size=7, poll_interval_s=0.1) for name in "ab"]

    def write(writer: int) -> None:
        for i in range(60):
            event = Event.create(StringValue(value=f"{writer}-{i}"), key=f"key-{writer}", source="s", catalog=catalog)
            with database.transaction() as session:
                Outbox.add(session, event)

    for relay in relays:
        relay.start()
    try:
        writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        deadline = time.monotonic() + 30
        while len(log) < 240 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a duplicate would arrive now
    finally:
        for relay in relays:
            relay.stop()
    ids = [event.event_id for _, event in log]
    assert len(ids) == 240 and len(set(ids)) == 240, f"{len(ids)} published, {len(set(ids))} distinct"
    for writer in range(4):
        values = [event.payload for _, event in log if event.key == f"key-{writer}"]
        assert values == [StringValue(value=f"{writer}-{i}").SerializeToString() for i in range(60)]
    with database.transaction() as session:
        assert Outbox.pending(session) == 0
