"""The consumer's watchdog (a member stuck outside its group re-creates its client), its health, and the run
loop's guard against spinning when the client returns at once. On the in-process bus, with the transport's
view of the group replaced by one the test controls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from gristmill.core.events import Event, MemoryBroker, MemoryEventBus
from gristmill.core.events.bus import Consumer, Membership, Record
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.sql import Database

TOPIC = "gristmill.test.watchdog.v1"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[MemoryEventBus]:
    database = Database(f"sqlite:///{tmp_path / 'events.db'}")
    database.create_all()
    with MemoryEventBus(MemoryBroker(), database=database, metrics=ServiceMetrics("test")) as bus:
        yield bus
    database.dispose()


def ignore(_event: Event, _session: Session) -> None:
    pass


def wait_until(condition: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


class StuckTransport:
    """Stands in for the client's view of the group: stuck rebalancing until the client is re-created."""

    def __init__(self, stuck: Membership) -> None:
        self.stuck = stuck
        self.recreated = threading.Event()

    def membership(self) -> Membership:
        if self.recreated.is_set():
            return Membership(state="stable", assigned=((TOPIC, 0), (TOPIC, 1)), partitions=2)
        return self.stuck

    def recreate(self) -> None:
        self.recreated.set()


def watched(bus: MemoryEventBus, transport: StuckTransport, stall_timeout_s: float) -> Consumer:
    consumer = bus.subscribe([TOPIC], "watched", ignore)
    consumer.stall_timeout_s = stall_timeout_s
    consumer.membership = transport.membership  # type: ignore[method-assign]
    consumer._recreate_client = transport.recreate  # type: ignore[method-assign]
    return consumer


@pytest.mark.parametrize(
    "stuck",
    [
        # The kafka-python stall: a join abandoned in flight leaves the member rebalancing with nothing.
        Membership(state="rebalancing", assigned=(), partitions=2),
        # A group formed before its topic had partitions: stable, but nobody holds them.
        Membership(state="stable", assigned=(), partitions=2),
    ],
    ids=["rebalancing", "stable-without-partitions"],
)
def test_a_stalled_member_recreates_its_client_and_reports_it_meanwhile(bus: MemoryEventBus, stuck: Membership) -> None:
    transport = StuckTransport(stuck)
    consumer = watched(bus, transport, stall_timeout_s=0.6)
    health_while_stuck = []
    with consumer.run_in_background(poll_timeout_s=0.05):
        started = time.monotonic()
        assert consumer.health().ok, "unsettled for less than the bound is not a stall yet"
        # Watch the health the service host publishes while the member is stuck.
        while not transport.recreated.is_set():
            health_while_stuck.append(consumer.health())
            assert time.monotonic() - started < 10, "the watchdog never re-created the stalled client"
            time.sleep(0.02)
        waited = time.monotonic() - started
        assert waited >= 0.6, "re-created before the bound"
        assert consumer.rejoins == 1
        assert "stalled: state " in consumer.health().reason
        wait_until(lambda: consumer.health().ok, "the re-created client is settled and healthy")
        assert consumer.rejoins == 1, "a settled member is left alone"
    metrics = bus.metrics
    assert metrics is not None
    assert metrics.consumer_rejoins.labels("test", "watched")._value.get() == 1
    assert metrics.consumer_assigned.labels("test", "watched")._value.get() == 2
    assert all(h.ok for h in health_while_stuck), "healthy until the bound passed"
    assert not consumer.health().ok and consumer.health().reason == "stopped"


@pytest.mark.parametrize(
    "membership",
    [
        Membership(state="stable", assigned=((TOPIC, 0),), partitions=3),
        Membership(state="stable", assigned=(), partitions=0),  # nothing to hold yet
        Membership(state="stable", assigned=(), partitions=3, others_can_hold=True),  # more members than partitions
    ],
    ids=["holding", "no-partitions", "idle-member"],
)
def test_a_settled_member_is_left_alone(bus: MemoryEventBus, membership: Membership) -> None:
    transport = StuckTransport(membership)
    consumer = watched(bus, transport, stall_timeout_s=0.2)
    with consumer.run_in_background(poll_timeout_s=0.05):
        time.sleep(1.0)
        assert consumer.health().ok
    assert not transport.recreated.is_set() and consumer.rejoins == 0


def test_a_client_that_returns_at_once_is_not_polled_in_a_busy_loop(bus: MemoryEventBus) -> None:
    consumer = bus.subscribe([TOPIC], "spinning", ignore)
    fetches = 0

    def empty_at_once(_timeout_s: float) -> list[Record]:
        nonlocal fetches
        fetches += 1
        return []

    consumer._fetch = empty_at_once  # type: ignore[method-assign]
    with consumer.run_in_background(poll_timeout_s=0.1):
        time.sleep(1.0)
    # Without the guard this loop runs tens of thousands of times a second.
    assert 5 <= fetches <= 15, fetches


def test_a_fetch_that_never_returns_makes_the_consumer_unhealthy(bus: MemoryEventBus) -> None:
    consumer = bus.subscribe([TOPIC], "hanging", ignore)
    consumer.stall_timeout_s = 0.3
    release = threading.Event()

    def hang(_timeout_s: float) -> list[Record]:
        release.wait(10)
        return []

    consumer._fetch = hang  # type: ignore[method-assign]
    consumer.run_in_background(poll_timeout_s=0.05)
    try:
        wait_until(lambda: not consumer.health().ok, "a hung fetch shows in the health")
        assert "a fetch has not returned for" in consumer.health().reason
    finally:
        release.set()
        consumer.stop()
