"""The Kafka event bus against the real broker (``deploy/local/kafka.sh``): the conformance suite, an outbox
that survives a broker outage, and the relay publishing a large batch from PostgreSQL in one pass."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from sqlalchemy.orm import Session

from gristmill.core.errors import UnavailableError
from gristmill.core.events import Event, EventCatalog, KafkaEventBus, Outbox, OutboxEvent, OutboxRelay, Record
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database
from tests.contracts.event_bus import EventBusContract, ReadRecords
from tests.support.databases import fresh_postgres_database

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO_ROOT / "deploy" / "local" / "kafka.sh"
# Short timeouts: a local broker answers in milliseconds, and the outage test waits for failures.
CONSUMER_OPTIONS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


@pytest.fixture
def settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap, client_id="gristmill-test", request_timeout_ms=5000, topic_partitions=3
    )


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'events.db'}")
    db.create_all()
    yield db
    db.dispose()


def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 20.0) -> list[Record]:
    """Every record of ``topic`` from the beginning, without a consumer group, once there are ``count``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        assert partitions, f"topic {topic} does not exist"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(
                    Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ())) for r in batch
                )
        for batch in consumer.poll(timeout_ms=200).values():  # anything beyond ``count`` shows up here
            records.extend(Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers)) for r in batch)
        assert len(records) == count, f"expected {count} records on {topic}, found {len(records)}"
        return records
    finally:
        consumer.close()


class TestKafkaBus(EventBusContract):
    @pytest.fixture
    def publisher(
        self, settings: KafkaSettings, tracing: tuple[TracerProvider, InMemorySpanExporter]
    ) -> Iterator[KafkaEventBus]:
        with KafkaEventBus(settings, tracer_provider=tracing[0]) as bus:
            yield bus

    @pytest.fixture
    def subscriber(
        self, settings: KafkaSettings, database: Database, tracing: tuple[TracerProvider, InMemorySpanExporter]
    ) -> Iterator[KafkaEventBus]:
        with KafkaEventBus(
            settings, database=database, tracer_provider=tracing[0], consumer_options=CONSUMER_OPTIONS
        ) as bus:
            yield bus

    @pytest.fixture
    def read_records(self, kafka_bootstrap: str) -> ReadRecords:
        return lambda topic, count: read_topic(kafka_bootstrap, topic, count)


def kafka_script(verb: str, timeout_s: float = 120) -> None:
    done = subprocess.run(
        [str(KAFKA_SCRIPT), verb], capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy()
    )
    assert done.returncode == 0, f"deploy/local/kafka.sh {verb} failed: {done.stdout}{done.stderr}"


def test_unreachable_broker_is_unavailable_with_a_clear_message() -> None:
    catalog = EventCatalog()
    catalog.register(StringValue, "gristmill.test.unreachable.v1")
    event = Event.create(StringValue(value="x"), key="k", source="test", catalog=catalog)
    # Port 1 on loopback: nothing listens there.
    bus = KafkaEventBus(KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000))
    with bus, pytest.raises(UnavailableError, match=r"Kafka at 127\.0\.0\.1:1 could not .* within 1s"):
        bus.publish(event)


@pytest.mark.slow
@pytest.mark.exclusive  # it stops the broker every other test uses
def test_outbox_event_survives_a_broker_outage(kafka_bootstrap: str, database: Database) -> None:
    """Events written while the broker is down stay in the outbox, and after the restart a consumer that was
    running all along gets each of them once, in order per key."""
    topic = f"gristmill.test.outage{uuid.uuid4().hex[:12]}.v1"
    catalog = EventCatalog()
    catalog.register(StringValue, topic)
    keys = ["job-a", "job-b"]
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id="gristmill-test", request_timeout_ms=1000)
    bus = KafkaEventBus(settings, database=database, consumer_options=CONSUMER_OPTIONS)
    relay = OutboxRelay(database, bus, retry_backoff_s=0.2, max_backoff_s=1.0)
    handled: list[tuple[str, str]] = []

    def handle(event: Event, _session: Session) -> None:
        handled.append((event.key, event.event_id))

    def wait_for(count: int, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(handled) < count:
            assert time.monotonic() < deadline, f"timed out waiting for {what} (last error: {consumer.last_error})"
            time.sleep(0.05)

    def write(text: str, key: str) -> Event:
        event = Event.create(StringValue(value=text), key=key, source="test", catalog=catalog)
        with database.transaction() as session:
            Outbox.add(session, event)  # a state change would be written here too
        return event

    consumer = bus.subscribe([topic], "outage-check", handle)
    with consumer.run_in_background(retry_backoff_s=0.2, max_backoff_s=1.0):
        sent = [write("before the outage", keys[0])]
        assert relay.relay_once() == 1, "the relay publishes while the broker is up"
        wait_for(1, "the event published before the outage")

        kafka_script("stop")
        try:
            sent += [write(f"during the outage {i}", keys[i % 2]) for i in range(5)]
            with pytest.raises(UnavailableError, match="Kafka at"):
                relay.relay_once()
            relay.start()  # keeps retrying with backoff while the broker is down
            deadline = time.monotonic() + 30
            while relay.consecutive_failures < 2:
                assert time.monotonic() < deadline, "the relay did not keep retrying"
                time.sleep(0.05)
            relay.stop()
            with database.transaction() as session:
                rows = list(session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars())
            assert [r.published_at is None for r in rows] == [False] + [True] * 5, "nothing lost or marked early"
            assert rows[1].attempts >= 2 and "Kafka at" in (rows[1].last_error or "")
            assert [r.attempts for r in rows[2:]] == [0] * 4, "the relay never skips past a failed row"
        finally:
            kafka_script("start")

        assert relay.drain(timeout_s=60) == 5
        wait_for(len(sent), "every outbox event after the restart")
        time.sleep(0.5)  # a duplicate would show up now
    bus.close()
    ids = [event_id for _, event_id in handled]
    assert sorted(ids) == sorted(e.event_id for e in sent) and len(ids) == len(sent), "each event exactly once"
    for key in keys:
        assert [i for k, i in handled if k == key] == [e.event_id for e in sent if e.key == key], f"order of {key}"


@pytest.fixture
def postgres() -> Iterator[Database]:
    """A fresh database on the real PostgreSQL server, with the shared tables (outbox, handled events)."""
    for url in fresh_postgres_database():
        db = Database(url)
        db.create_all()
        try:
            yield db
        finally:
            db.dispose()


def test_the_relay_publishes_a_batch_of_300_in_one_pass_in_order(
    settings: KafkaSettings, kafka_bootstrap: str, postgres: Database
) -> None:
    """One ``relay_once`` hands all 300 pending rows to the broker as one batch: every row is confirmed and
    marked published, and each key's events are in the topic in the order they were written."""
    topic = f"gristmill.test.relay{uuid.uuid4().hex[:12]}.v1"
    catalog = EventCatalog()
    catalog.register(StringValue, topic)
    keys = [f"job-{i}" for i in range(4)]
    events = [
        Event.create(StringValue(value=str(i)), key=keys[i % 4], source="test", catalog=catalog) for i in range(300)
    ]
    with postgres.transaction() as session:
        for event in events:
            Outbox.add(session, event)
    metrics = ServiceMetrics("relay-test")
    with KafkaEventBus(settings, metrics=metrics) as bus:
        relay = OutboxRelay(postgres, bus, metrics=metrics)
        assert relay.relay_once() == 300
        with postgres.transaction() as session:
            assert Outbox.pending(session) == 0
        assert metrics.events_published.labels("relay-test", topic)._value.get() == 300
    records = read_topic(kafka_bootstrap, topic, 300)
    for key in keys:
        got = [dict(r.headers)["event-id"].decode() for r in records if r.key == key.encode()]
        assert got == [e.event_id for e in events if e.key == key], f"order of {key}"
    assert sorted(r.value or b"" for r in records) == sorted(e.payload for e in events)


def test_a_rejoin_that_outlasts_short_polls_still_completes(settings: KafkaSettings, database: Database) -> None:
    """The stall seen on fresh brokers, made deterministic: new partitions make the group's leader rejoin while
    every poll gives up after a millisecond, so the JoinGroup/SyncGroup round trip is always left in flight.
    kafka-python 3.0.12 alone then never completes it (the member stays rebalancing with no partitions and
    reads nothing until restarted); with ``_PendingJoinCoordinator`` the next poll awaits it. The watchdog is
    off here, so this shows the fix itself."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewPartitions

    topic = f"gristmill.test.rejoin{uuid.uuid4().hex[:12]}.v1"
    bus = KafkaEventBus(
        settings.model_copy(update={"topic_partitions": 2}), database=database, consumer_options=CONSUMER_OPTIONS
    )
    consumer = bus.subscribe([topic], f"rejoin-{uuid.uuid4().hex[:8]}", lambda _event, _session: None)
    consumer.stall_timeout_s = float("inf")
    try:
        deadline = time.monotonic() + 30
        while len(consumer.membership().assigned) < 2:
            assert time.monotonic() < deadline, f"never assigned: {consumer.membership().describe()}"
            consumer.poll_once(0.5)
        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        try:
            admin.create_partitions({topic: NewPartitions(total_count=4)})
        finally:
            admin.close()
        deadline = time.monotonic() + 40
        while (membership := consumer.membership()).assigned != tuple((topic, p) for p in range(4)):
            assert time.monotonic() < deadline, f"the rejoin never completed: {membership.describe()}"
            consumer.poll_once(0.001)
            time.sleep(0.01)
        assert membership.state == "stable"
    finally:
        bus.close()


_MEMBER = """
import sys, time
from gristmill.core.events import KafkaEventBus
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database

bootstrap, topic, group, db = sys.argv[1:]
database = Database(f"sqlite:///{db}")
bus = KafkaEventBus(KafkaSettings(bootstrap_servers=bootstrap, topic_partitions=2), database=database)
consumer = bus.subscribe([topic], group, lambda _event, _session: None)
while len(consumer.membership().assigned) < 2:
    consumer.poll_once(0.2)
print("assigned", flush=True)
while True:
    consumer.poll_once(0.2)
"""


def test_a_restarted_member_gets_the_partitions_of_its_killed_self_within_the_session_timeout(
    settings: KafkaSettings, database: Database, tmp_path: Path
) -> None:
    """A service killed without leaving its group (SIGKILL) and started again: the broker waits for the dead
    member's session to time out before it assigns the partitions again. The settings' default session timeout
    (10 s, not kafka-python's 45 s) bounds that wait; the stall watchdog (30 s) is off, so only the session counts."""
    topic = f"gristmill.test.restart{uuid.uuid4().hex[:12]}.v1"
    group = f"restart-{uuid.uuid4().hex[:8]}"
    member = subprocess.Popen(
        [sys.executable, "-c", _MEMBER, settings.bootstrap_servers, topic, group, str(tmp_path / "member.db")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert member.stdout is not None
        assert member.stdout.readline().strip() == "assigned", "the first member never got the partitions"
    finally:
        member.kill()
        member.wait()
    killed = time.monotonic()
    seen: list[str] = []
    bus = KafkaEventBus(settings.model_copy(update={"topic_partitions": 2}), database=database)
    consumer = bus.subscribe([topic], group, lambda event, _session: seen.append(event.event_id))
    consumer.stall_timeout_s = float("inf")
    try:
        catalog = EventCatalog()
        catalog.register(StringValue, topic)
        event = Event.create(StringValue(value="after"), key="k", source="test", catalog=catalog)
        bus.publish(event)
        limit = settings.session_timeout_ms / 1000 + 10
        while not seen:
            assert time.monotonic() - killed < limit, f"no partitions after {limit:.0f}s: {consumer.membership()}"
            consumer.poll_once(0.5)
        assert seen == [event.event_id]
        assert consumer.membership().assigned == ((topic, 0), (topic, 1))
    finally:
        bus.close()
