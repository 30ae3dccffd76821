"""The usage aggregator on the in-process bus (each event counted once, bad ones dead-lettered) and its queries."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from gristmill.admin.domain.metering import MAX_PERIODS
from gristmill.admin.domain.model import Granularity, UsageQuery, UsageTotal
from gristmill.admin.events.handlers import usage_recorded_handler
from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth import ADMIN, REGISTRY_READ, Principal
from gristmill.core.auth_quota import Plan, Quota, QuotaPeriod, UsageKind
from gristmill.core.errors import InvalidArgumentError, NotFoundError
from gristmill.core.events import Event, MemoryBroker, MemoryEventBus, dead_letter_topic
from gristmill.core.events.topics import USAGE_RECORDED, platform_catalog
from services.admin.tests.support import ROOT_ADMIN, T0, Env

CATALOG = platform_catalog()
P = UsageKind.PREDICTIONS
T = UsageKind.INPUT_TOKENS


@pytest.fixture
def bus(env: Env) -> Iterator[tuple[MemoryEventBus, MemoryBroker]]:
    broker = MemoryBroker()
    with MemoryEventBus(broker, database=env.database) as memory_bus:
        yield memory_bus, broker


def _event(
    org: str,
    key: str,
    kind: UsageKind | int,
    quantity: float,
    at: datetime,
    more: Sequence[tuple[UsageKind | int, float]] = (),
) -> Event:
    def value(kind: UsageKind | int) -> int:
        return kind.value if isinstance(kind, UsageKind) else kind

    message = events_pb2.UsageRecorded(
        organization_id=org,
        api_key_id=key,
        kind=value(kind),
        quantity=quantity,
        resource="deployment/d",
        more=[events_pb2.UsageAmount(kind=value(k), quantity=q) for k, q in more],
    )
    return Event.create(message, key=org or "default", source="serving", catalog=CATALOG, event_time=at)


def _consume(env: Env, bus: MemoryEventBus, events: list[Event]) -> None:
    for event in events:
        bus.publish(event)
    consumer = bus.subscribe([USAGE_RECORDED], "metering-test", usage_recorded_handler(env.metering, CATALOG))
    while consumer.poll_once(timeout_s=0.01):
        pass
    consumer.stop()


def _acme(env: Env) -> Principal:
    env.admin.create_organization(ROOT_ADMIN, "acme", "", Plan("team", (Quota(P, QuotaPeriod.DAY, 10),)))
    secret = env.admin.create_key(ROOT_ADMIN, "acme", "reader", [REGISTRY_READ], None).secret
    principal = env.verifier.verify(secret)
    assert principal is not None
    return principal


def test_each_event_is_counted_once_per_hour_key_and_kind(env: Env, bus: tuple[MemoryEventBus, MemoryBroker]) -> None:
    acme = _acme(env)
    first = _event("acme", "k1", P, 2, T0)
    events = [
        first,
        first,  # redelivered: the same event-id
        _event("acme", "k1", P, 3, T0 + timedelta(minutes=10)),
        _event("acme", "k2", P, 5, T0 + timedelta(hours=1)),
        _event("acme", "k1", T, 40, T0),
        _event("globex", "k9", P, 100, T0),
    ]
    _consume(env, bus[0], events)
    env.clock.now = T0 + timedelta(hours=3)
    totals = env.metering.usage(acme, UsageQuery("", start=T0 - timedelta(hours=1)))
    assert {(t.kind, t.quantity) for t in totals} == {
        (P, 10.0),
        (T, 40.0),
        (UsageKind.TRAINING_WORKER_SECONDS, 0.0),
        (UsageKind.OUTPUT_TOKENS, 0.0),
    }
    by_key = env.metering.usage(acme, UsageQuery("", kinds=(P,), start=T0, group_by_api_key=True))
    assert {(t.api_key_id, t.quantity) for t in by_key} == {("k1", 5.0), ("k2", 5.0)}
    hourly = env.metering.usage(acme, UsageQuery("", kinds=(P,), start=T0, granularity=Granularity.HOUR))
    hour = T0.replace(minute=0)
    assert [(t.period_start, t.period_end, t.quantity) for t in hourly] == [
        (T0, hour + timedelta(hours=1), 5.0),  # the first period is clipped to the range
        (hour + timedelta(hours=1), hour + timedelta(hours=2), 5.0),
    ]


def test_events_that_cannot_be_counted_are_dead_lettered(env: Env, bus: tuple[MemoryEventBus, MemoryBroker]) -> None:
    acme = _acme(env)
    bad = [_event("acme", "k1", P, 0, T0), _event("acme", "k1", P, -2, T0), _event("acme", "k1", 99, 1, T0)]
    _consume(env, bus[0], [*bad, _event("acme", "k1", P, 1, T0)])
    dead = bus[1].records(dead_letter_topic(USAGE_RECORDED))
    assert len(dead) == 3
    errors = [dict(r.headers)["error"].decode() for r in dead]
    assert any("positive number" in e for e in errors) and any("unknown kind 99" in e for e in errors)
    env.clock.now = T0 + timedelta(hours=1)
    totals = env.metering.usage(acme, UsageQuery("", kinds=(P,), start=T0))
    assert [t.quantity for t in totals] == [1.0]


def test_quota_status_reports_used_and_left_in_the_current_period(
    env: Env, bus: tuple[MemoryEventBus, MemoryBroker]
) -> None:
    acme = _acme(env)
    yesterday = T0 - timedelta(days=1)
    _consume(env, bus[0], [_event("acme", "k1", P, 4, T0), _event("acme", "k1", P, 50, yesterday)])
    org, statuses = env.metering.quota_status(acme, "")
    assert org.plan.name == "team"
    [status] = statuses
    assert (status.used, status.remaining) == (4.0, 6.0)
    assert status.period_end == T0.replace(hour=0, minute=0) + timedelta(days=1)


def test_usage_of_other_organisations_needs_a_root_admin(env: Env) -> None:
    acme = _acme(env)
    env.admin.create_organization(ROOT_ADMIN, "globex", "", Plan())
    for org in ("globex", "nowhere"):
        with pytest.raises(NotFoundError, match=f"organization '{org}' not found"):
            env.metering.usage(acme, UsageQuery(org))
        with pytest.raises(NotFoundError, match=f"organization '{org}' not found"):
            env.metering.quota_status(acme, org)
    assert [t.quantity for t in env.metering.usage(ROOT_ADMIN, UsageQuery("globex"))] == [0.0] * len(UsageKind)
    assert env.metering.quota_status(ROOT_ADMIN, "acme")[0].organization_id == "acme"
    with pytest.raises(NotFoundError, match="organization 'nowhere' not found"):
        env.metering.usage(ROOT_ADMIN, UsageQuery("nowhere"))


def test_usage_queries_are_validated(env: Env) -> None:
    acme = _acme(env)
    globex_key = env.admin.create_key(ROOT_ADMIN, "", "root key", [ADMIN], None).key.api_key_id
    with pytest.raises(InvalidArgumentError, match="end_time is before start_time"):
        env.metering.usage(acme, UsageQuery("", start=T0, end=T0 - timedelta(seconds=1)))
    with pytest.raises(InvalidArgumentError, match=f"more than {MAX_PERIODS} hour periods"):
        env.metering.usage(acme, UsageQuery("", start=T0, end=T0 + timedelta(days=500), granularity=Granularity.HOUR))
    # Another organisation's key, and no key at all, look the same.
    for key_id in (globex_key, "0123456789abcdef"):
        with pytest.raises(NotFoundError, match=f"API key '{key_id}' not found"):
            env.metering.usage(acme, UsageQuery("", api_key_id=key_id))
    # The same range by day is fine.
    days = env.metering.usage(acme, UsageQuery("", start=T0, end=T0 + timedelta(days=500), granularity=Granularity.DAY))
    assert days == []


def test_default_range_is_the_current_month_so_far(env: Env, bus: tuple[MemoryEventBus, MemoryBroker]) -> None:
    acme = _acme(env)
    month_start = T0.replace(day=1, hour=0, minute=0)
    _consume(
        env,
        bus[0],
        [_event("acme", "k", P, 1, month_start), _event("acme", "k", P, 7, month_start - timedelta(hours=1))],
    )
    [total] = env.metering.usage(acme, UsageQuery("", kinds=(P,)))
    assert total == UsageTotal(P, "", month_start, T0, 1.0)


def test_an_event_carrying_several_kinds_counts_each(env: Env, bus: tuple[MemoryEventBus, MemoryBroker]) -> None:
    acme = _acme(env)
    events = [
        _event("acme", "k1", P, 2, T0, more=[(T, 30)]),
        _event("acme", "k1", P, 1, T0, more=[(T, 12), (UsageKind.OUTPUT_TOKENS, 5)]),
        # Each is malformed as a whole: nothing of it is counted, the rest of the batch is.
        _event("acme", "k1", P, 1, T0, more=[(T, 4), (T, 4)]),
        _event("acme", "k1", P, 1, T0, more=[(P, 1)]),
        _event("acme", "k1", P, 1, T0, more=[(T, -3)]),
        _event("acme", "k1", P, 1, T0, more=[(99, 1)]),
    ]
    _consume(env, bus[0], events)
    dead = bus[1].records(dead_letter_topic(USAGE_RECORDED))
    assert [dict(r.headers)["event-id"] for r in dead] == [e.event_id.encode() for e in events[2:]]
    errors = [dict(r.headers)["error"].decode() for r in dead]
    assert sum("more than once" in e for e in errors) == 2
    env.clock.now = T0 + timedelta(hours=1)
    totals = env.metering.usage(acme, UsageQuery("", start=T0))
    assert {(t.kind, t.quantity) for t in totals} == {
        (P, 3.0),
        (T, 42.0),
        (UsageKind.OUTPUT_TOKENS, 5.0),
        (UsageKind.TRAINING_WORKER_SECONDS, 0.0),
    }


def test_a_batch_is_summed_with_one_store_write_per_hour_key_and_kind(
    env: Env, bus: tuple[MemoryEventBus, MemoryBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = _acme(env)
    writes: list[tuple[str, str, UsageKind, datetime, float]] = []
    add_usage = env.store.add_usage

    def counted(session: Any, org: str, key: str, kind: UsageKind, hour: datetime, quantity: float) -> None:
        writes.append((org, key, kind, hour, quantity))
        add_usage(session, org, key, kind, hour, quantity)

    monkeypatch.setattr(env.store, "add_usage", counted)
    # 60 events in 4 totals (two keys, two hours), with quantities whose sum is exact in binary.
    events = [
        _event("acme", f"k{i % 2}", P, 0.25 * (i % 3 + 1), T0 + timedelta(hours=i // 30, minutes=i % 5))
        for i in range(60)
    ]
    _consume(env, bus[0], events)
    assert len(writes) == 4, "one upsert per (organisation, key, kind, hour) of the batch"
    assert sum(w[4] for w in writes) == sum(0.25 * (i % 3 + 1) for i in range(60))
    env.clock.now = T0 + timedelta(hours=2)
    by_key = env.metering.usage(acme, UsageQuery("", kinds=(P,), start=T0, group_by_api_key=True))
    assert {(t.api_key_id, t.quantity) for t in by_key} == {
        (key, sum(0.25 * (i % 3 + 1) for i in range(60) if i % 2 == k)) for k, key in enumerate(("k0", "k1"))
    }


def test_an_invalid_event_in_a_batch_is_dead_lettered_alone(env: Env, bus: tuple[MemoryEventBus, MemoryBroker]) -> None:
    acme = _acme(env)
    good = [_event("acme", "k1", P, 1, T0 + timedelta(minutes=i)) for i in range(10)]
    bad = _event("acme", "k1", P, -1, T0)
    _consume(env, bus[0], [*good[:5], bad, *good[5:]])
    (dead,) = bus[1].records(dead_letter_topic(USAGE_RECORDED))
    assert dict(dead.headers)["event-id"] == bad.event_id.encode()
    assert dict(dead.headers)["error-type"] == b"InvalidUsageError"
    env.clock.now = T0 + timedelta(hours=1)
    assert [t.quantity for t in env.metering.usage(acme, UsageQuery("", kinds=(P,), start=T0))] == [10.0]
