"""A Kafka cluster of three KRaft brokers on three nodes loses a broker mid-stream: nothing is lost, nothing applied
twice, and the stream stalls no longer than the cluster takes to elect new leaders.

The platform's own path end to end: events written to an outbox (SQLite) in their own transactions, published by
the real ``OutboxRelay`` through ``KafkaEventBus`` (acks=all, idempotent producer), consumed by the bus's consumer
in a group with the handled-event dedupe, each event's effect written in the handler's transaction, with the
services' default settings. Mid-stream the node of the broker that leads most of the topic's partitions (the active
controller on a tie) is killed (SIGKILL to every process of the node). The test prints what it measured: the
cluster's start-up, the leader election, the longest pause in consumption and how long events took end to end.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.orm import Session

from gristmill.core.events import Event, EventCatalog, KafkaEventBus, Outbox, OutboxEvent, OutboxRelay
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database
from tests.support.cluster import NodeCluster, kafka_controller, start_kafka_cluster

pytestmark = pytest.mark.cluster

NODES = (1, 2, 3)
EVENTS = 3000
RATE_PER_S = 100.0  # 30 s of events
KILL_AFTER = 1000  # events written before the kill (~10 s in)
KEYS = 12
# What the brokers' default session timeout (9 s) plus a controller election allows, with margin.
MAX_ELECTION_S = 30.0
MAX_STALL_S = 30.0
# Beyond the election, what clients may take to notice it (a metadata refresh, a retry backoff).
STALL_MARGIN_S = 5.0
DRAIN_TIMEOUT_S = 180.0

effects_metadata = MetaData()
# The consumer's effect: one row per application (no unique key, so an effect applied twice shows as two rows).
effects = Table(
    "cluster_test_effects",
    effects_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("seq", Integer, nullable=False),
)


@dataclass
class Election:
    """When, after the kill, the surviving brokers reported the topic's and the offsets topic's partitions led
    elsewhere, the killed broker out of every in-sync replica set, and a new active controller."""

    killed_at: float
    leaders_moved_s: float | None = None
    offsets_leaders_moved_s: float | None = None
    isr_shrunk_s: float | None = None
    controller_s: float | None = None
    new_controller: int | None = None
    polls: int = 0
    errors: list[tuple[float, str]] = field(default_factory=list)  # (seconds after the kill, error)


def admin(bootstrap: str) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000)


def partitions(client: KafkaAdminClient, topic: str) -> list[dict[str, Any]]:
    described = client.describe_topics([topic])
    assert described and described[0]["error_code"] == 0, f"describing {topic}: {described}"
    return list(described[0]["partitions"])


def watch_election(
    cluster: NodeCluster, bootstrap: str, topic: str, victim: int, survivors: list[int], election: Election
) -> None:
    """Poll the survivors every 0.2 s until the election is over (or 60 s passed)."""
    deadline = election.killed_at + 60
    while time.monotonic() < deadline:
        now = time.monotonic() - election.killed_at
        if election.controller_s is None:
            controller = kafka_controller(cluster, survivors[0])
            if controller is not None and controller != victim:
                election.controller_s, election.new_controller = now, controller
        client = None
        try:
            client = admin(bootstrap)
            mine = partitions(client, topic)
            offsets = partitions(client, "__consumer_offsets")
        except Exception as exc:  # a survivor may time out while the cluster re-elects: just ask again
            election.errors.append((now, f"{type(exc).__name__}: {exc}"))
            mine = offsets = []
        finally:
            if client is not None:
                client.close()
        election.polls += 1

        def moved(parts: list[dict[str, Any]]) -> bool:
            return bool(parts) and all(p["leader_id"] not in (victim, -1) for p in parts)

        if election.leaders_moved_s is None and moved(mine):
            election.leaders_moved_s = now
        if election.offsets_leaders_moved_s is None and moved(offsets):
            election.offsets_leaders_moved_s = now
        if election.isr_shrunk_s is None and mine and all(victim not in p["isr_nodes"] for p in [*mine, *offsets]):
            election.isr_shrunk_s = now
        if None not in (
            election.leaders_moved_s,
            election.offsets_leaders_moved_s,
            election.isr_shrunk_s,
            election.controller_s,
        ):
            return
        time.sleep(0.2)


def longest_gap(times: list[float]) -> tuple[float, float]:
    """The longest pause between consecutive times, and when it began."""
    ordered = sorted(times)
    gaps = [(b - a, a) for a, b in itertools.pairwise(ordered)]
    return max(gaps, default=(0.0, ordered[0] if ordered else 0.0))


def wait_until(condition: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s: {what()}"
        time.sleep(0.1)


def test_a_broker_dies_mid_stream_and_no_event_is_lost_or_applied_twice(
    node_cluster: Callable[..., NodeCluster], tmp_path: Path
) -> None:
    cluster = node_cluster(len(NODES))
    began = time.monotonic()
    bootstrap = start_kafka_cluster(cluster, NODES)
    started_s = time.monotonic() - began
    print(f"\nKAFKA CLUSTER: 3 brokers up (quorum formed, each answering) in {started_s:.1f} s; bootstrap {bootstrap}")

    topic = f"gristmill.test.cluster{uuid.uuid4().hex[:10]}.v1"
    catalog = EventCatalog()
    catalog.register(StringValue, topic)
    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="cluster-test")  # the services' defaults

    # The producing service: its database's outbox and the relay that publishes it.
    outbox_db = Database(f"sqlite:///{tmp_path / 'producer.db'}")
    outbox_db.create_all()
    publisher = KafkaEventBus(settings, metrics=ServiceMetrics("cluster-producer"))
    relay = OutboxRelay(outbox_db, publisher)
    # The consuming service: handled-event dedupe and the effect in its own database.
    consumer_db = Database(f"sqlite:///{tmp_path / 'consumer.db'}")
    consumer_db.create_all()
    effects_metadata.create_all(consumer_db.engine)
    consumer_metrics = ServiceMetrics("cluster-consumer")
    subscriber = KafkaEventBus(settings, database=consumer_db, metrics=consumer_metrics)

    written_at: dict[int, float] = {}
    handled_at: list[tuple[float, int]] = []  # every handler call, including any rolled back

    def handle(event: Event, session: Session) -> None:
        seq = int(catalog.decode(event, StringValue).value)
        session.execute(insert(effects).values(event_id=event.event_id, seq=seq))
        handled_at.append((time.monotonic(), seq))

    def applied() -> int:
        with consumer_db.transaction() as session:
            return int(session.execute(select(func.count()).select_from(effects)).scalar_one())

    stop_writing = threading.Event()

    def write_events() -> None:
        start = time.monotonic()
        for seq in range(EVENTS):
            delay = start + seq / RATE_PER_S - time.monotonic()
            if delay > 0 and stop_writing.wait(delay):
                return
            event = Event.create(StringValue(value=str(seq)), key=f"key-{seq % KEYS}", source="test", catalog=catalog)
            with outbox_db.transaction() as session:
                Outbox.add(session, event)
            written_at[seq] = time.monotonic()

    writer = threading.Thread(target=write_events, name="writer", daemon=True)
    consumer = subscriber.subscribe([topic], "cluster-counter", handle)
    try:
        consumer.run_in_background()
        wait_until(
            lambda: consumer.membership().settled and bool(consumer.membership().assigned),
            60,
            lambda: f"the consumer never joined: {consumer.membership().describe()}",
        )
        relay.start()
        writer.start()
        wait_until(lambda: len(written_at) >= KILL_AFTER, 60, lambda: f"{len(written_at)} events written")

        # The victim: the broker leading most of the topic's partitions, the active controller on a tie.
        client = admin(bootstrap)
        try:
            before = partitions(client, topic)
        finally:
            client.close()
        led = Counter(int(p["leader_id"]) for p in before)
        controller = kafka_controller(cluster, 1)
        victim = max(NODES, key=lambda k: (led[k], k == controller))
        survivors = [k for k in NODES if k != victim]
        print(
            f"KAFKA CLUSTER: partition leaders {dict(sorted(led.items()))}, active controller {controller}; "
            f"killing node {victim} (its broker leads {led[victim]} of {len(before)} partitions"
            f"{', and is the active controller' if victim == controller else ''}) after {len(written_at)} events"
        )
        cluster.kill(victim)
        election = Election(killed_at=time.monotonic())
        behind = len(written_at) - len({seq for _, seq in list(handled_at)})
        survivors_bootstrap = ",".join(f"{cluster.ip(k)}:9092" for k in survivors)
        watch_election(cluster, survivors_bootstrap, topic, victim, survivors, election)

        writer.join(timeout=EVENTS / RATE_PER_S + 60)
        assert not writer.is_alive(), "the writer did not finish"
        wait_until(
            lambda: applied() >= EVENTS,
            DRAIN_TIMEOUT_S,
            lambda: (
                f"{applied()} of {EVENTS} effects applied (relay error: {relay.last_error}; "
                f"consumer error: {consumer.last_error}; {consumer.membership().describe()})"
            ),
        )
        time.sleep(3)  # a late duplicate would be applied now
    finally:
        stop_writing.set()
        relay.stop()
        subscriber.close()
        publisher.close()

    # What the cluster made of the topics: three replicas, two of which must have each write.
    client = admin(survivors_bootstrap)
    try:
        described = {t: partitions(client, t) for t in (topic, f"{topic}.dlq", "__consumer_offsets")}
        configs = client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})], config_filter="all"
        )
    finally:
        client.close()
    min_isr = configs["topic"][topic]["min.insync.replicas"]["value"]

    with consumer_db.transaction() as session:
        rows = session.execute(select(effects.c.event_id, effects.c.seq)).all()
    with outbox_db.transaction() as session:
        pending = Outbox.pending(session)
        republished = session.execute(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.attempts > 1)
        ).scalar_one()
    seqs = Counter(seq for _, seq in rows)
    lost = sorted(set(range(EVENTS)) - set(seqs))
    doubled = sorted(seq for seq, n in seqs.items() if n > 1)
    outcomes = {
        outcome: consumer_metrics.events_handled.labels("cluster-consumer", topic, outcome)._value.get()
        for outcome in ("handled", "duplicate", "dead_lettered")
    }
    first_handled: dict[int, float] = {}
    for at, seq in handled_at:
        first_handled.setdefault(seq, at)
    latencies = {seq: first_handled[seq] - written_at[seq] for seq in first_handled if seq in written_at}
    before_kill = sorted(v for seq, v in latencies.items() if written_at[seq] < election.killed_at)
    after_kill = sorted(v for seq, v in latencies.items() if written_at[seq] >= election.killed_at)
    gap, gap_began = longest_gap([at for at, _ in handled_at])
    gap_before, _ = longest_gap([at for at, _ in handled_at if at < election.killed_at])
    by_key: dict[int, list[int]] = {}
    for seq in sorted(first_handled, key=first_handled.__getitem__):
        by_key.setdefault(seq % KEYS, []).append(seq)
    out_of_order = [k for k, order in by_key.items() if order != sorted(order)]

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    print(
        "KAFKA CLUSTER: after the kill: topic leaders moved in "
        f"{seconds(election.leaders_moved_s)}, __consumer_offsets leaders in "
        f"{seconds(election.offsets_leaders_moved_s)}, the dead broker out of every ISR in "
        f"{seconds(election.isr_shrunk_s)}, active controller {election.new_controller} "
        f"(on record at a survivor after {seconds(election.controller_s)}); "
        f"{election.polls} polls of the survivors, {len(election.errors)} failed"
        + (
            f" (from {election.errors[0][0]:.1f} s to {election.errors[-1][0]:.1f} s; {election.errors[0][1]})"
            if election.errors
            else ""
        )
    )
    print(
        f"KAFKA CLUSTER: longest pause between consumed events {gap:.1f} s, beginning "
        f"{gap_began - election.killed_at:+.1f} s from the kill (longest before the kill {gap_before:.2f} s); "
        f"from outbox commit to effect, median / slowest: {median(before_kill):.1f} / {before_kill[-1]:.1f} s for "
        f"events written before the kill, {median(after_kill):.1f} / {after_kill[-1]:.1f} s after it (the consumer "
        f"was {behind} events behind at the kill)"
    )
    print(
        f"KAFKA CLUSTER: {EVENTS} events written, {len(set(seqs))} applied, {len(lost)} lost, "
        f"{len(doubled)} applied twice; consumer outcomes {outcomes}; {republished} outbox rows published more "
        f"than once; {len(out_of_order)} keys out of order; consumer rejoins {consumer.rejoins}"
    )
    print(
        "KAFKA CLUSTER: replicas per partition "
        + ", ".join(f"{t}: {sorted({len(p['replica_nodes']) for p in parts})}" for t, parts in described.items())
        + f"; min.insync.replicas of the topic {min_isr}"
    )

    assert all(len(p["replica_nodes"]) == 3 for parts in described.values() for p in parts), described
    assert min_isr == "2"
    assert not lost, f"{len(lost)} events lost, first {lost[:10]}"
    assert not doubled, f"{len(doubled)} effects applied twice, first {doubled[:10]}"
    assert pending == 0 and outcomes["dead_lettered"] == 0
    assert election.leaders_moved_s is not None and election.leaders_moved_s < MAX_ELECTION_S
    assert election.offsets_leaders_moved_s is not None
    elected_s = max(election.leaders_moved_s, election.offsets_leaders_moved_s)
    assert gap < MAX_STALL_S, f"consumption paused {gap:.1f} s"
    assert gap < elected_s + STALL_MARGIN_S, f"consumption paused {gap:.1f} s, the election took {elected_s:.1f} s"
    assert not out_of_order, f"keys whose events were applied out of order: {out_of_order}"
