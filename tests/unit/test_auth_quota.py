"""QuotaGuard: the (N+1)th call in a period is refused with a retry-after, usage counts successful calls only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gristmill.api.admin.v1 import admin_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth import Principal
from gristmill.core.auth_quota import (
    Plan,
    PlanSource,
    Quota,
    QuotaGuard,
    QuotaPeriod,
    RateLimit,
    UsageKind,
    UsageRecord,
    UsageRecorder,
    UsageSource,
    period_bounds,
    plan_from_proto,
    plan_to_proto,
)
from gristmill.core.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from gristmill.core.events import OutboxEvent
from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from tests.support.concurrency import run_in_threads

T0 = datetime(2026, 11, 10, 12, 30, tzinfo=UTC)
P = UsageKind.PREDICTIONS
ACME = Principal("acme", "k1", frozenset({"serving:predict"}))


class Plans(PlanSource):
    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def plan_for(self, organization_id: str) -> Plan:
        return self.plan


class Used(UsageSource):
    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self.asked: list[tuple[str, UsageKind, datetime, datetime]] = []

    def used(self, organization_id: str, kind: UsageKind, start: datetime, end: datetime) -> float:
        self.asked.append((organization_id, kind, start, end))
        return self.before


class Clock:
    def __init__(self) -> None:
        self.now = T0
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'svc.db'}")
    db.create_all()
    yield db
    db.dispose()


def _guard(database: Database, plan: Plan, used: Used | None = None, clock: Clock | None = None) -> QuotaGuard:
    clock = clock or Clock()
    recorder = UsageRecorder(database, platform_catalog(), "serving")
    return QuotaGuard(Plans(plan), used or Used(), recorder, clock=clock, monotonic=lambda: clock.mono)


def _published(database: Database) -> list[events_pb2.UsageRecorded]:
    with database.transaction() as session:
        rows = session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars()
        return [events_pb2.UsageRecorded.FromString(row.payload) for row in rows]


def _amounts(event: events_pb2.UsageRecorded) -> list[tuple[int, float]]:
    """(kind, quantity) of every kind the event carries."""
    return [(event.kind, event.quantity), *((more.kind, more.quantity) for more in event.more)]


def _total(database: Database, kind: UsageKind) -> float:
    return sum(q for event in _published(database) for k, q in _amounts(event) if k == kind.value)


def test_the_call_beyond_the_quota_is_refused_with_retry_after(database: Database) -> None:
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 5),)))
    for _ in range(5):
        with guard.reserve(ACME, {P: 1}, resource="deployment/d"):
            pass
    with pytest.raises(ResourceExhaustedError) as err:
        guard.reserve(ACME, {P: 1}, resource="deployment/d")
    midnight = datetime(2026, 11, 11, tzinfo=UTC)
    assert err.value.retry_after_s == int((midnight - T0).total_seconds())
    assert ("retry-after", str(err.value.retry_after_s)) in err.value.trailing_metadata()
    assert "predictions quota for this day (0 of 5 left" in err.value.message
    assert "resets at 2026-11-11T00:00:00Z" in err.value.message
    usage = _published(database)
    assert [(u.organization_id, u.api_key_id, u.kind, u.quantity, u.resource) for u in usage] == [
        ("acme", "k1", admin_pb2.USAGE_KIND_PREDICTIONS, 1.0, "deployment/d")
    ] * 5


def test_a_failed_call_releases_its_reservation_and_is_not_counted(database: Database) -> None:
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.HOUR, 2),)))
    for _ in range(3):
        with pytest.raises(RuntimeError), guard.reserve(ACME, {P: 2}, resource="deployment/d"):
            raise RuntimeError("model failed")
    with guard.reserve(ACME, {P: 2}, resource="deployment/d"):
        pass
    with pytest.raises(ResourceExhaustedError):
        guard.reserve(ACME, {P: 1}, resource="deployment/d")
    assert [u.quantity for u in _published(database)] == [2.0]


def test_usage_before_the_guard_started_counts_and_periods_roll_over(database: Database) -> None:
    clock = Clock()
    used = Used(before=3)
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 4),)), used, clock)
    guard.reserve(ACME, {P: 1}, resource="r").commit()
    with pytest.raises(ResourceExhaustedError):
        guard.reserve(ACME, {P: 1}, resource="r")
    assert used.asked == [("acme", P, *period_bounds(QuotaPeriod.DAY, T0))]
    # The next day starts from what the metering service knows of it (here: nothing).
    clock.now = T0 + timedelta(days=1)
    used.before = 0
    for _ in range(4):
        guard.reserve(ACME, {P: 1}, resource="r").commit()
    assert len(used.asked) == 2


def test_quotas_of_kinds_a_call_does_not_use_do_not_apply(database: Database) -> None:
    plan = Plan("team", (Quota(UsageKind.TRAINING_WORKER_SECONDS, QuotaPeriod.MONTH, 0),))
    guard = _guard(database, plan)
    guard.reserve(ACME, {P: 10}, resource="r").commit()
    with pytest.raises(ResourceExhaustedError, match="training worker seconds quota for this month"):
        guard.reserve(ACME, {UsageKind.TRAINING_WORKER_SECONDS: 1}, resource="job/j")


def test_the_rate_limit_is_a_token_bucket(database: Database) -> None:
    clock = Clock()
    guard = _guard(database, Plan("team", (), RateLimit(requests_per_second=2, burst=3)), clock=clock)
    for _ in range(3):
        guard.reserve(ACME, {P: 1}, resource="r").commit()
    with pytest.raises(ResourceExhaustedError, match="rate limit of 2 requests per second") as err:
        guard.reserve(ACME, {P: 1}, resource="r")
    assert err.value.retry_after_s == 1
    clock.mono += 0.5  # one token back
    guard.reserve(ACME, {P: 1}, resource="r").commit()
    with pytest.raises(ResourceExhaustedError):
        guard.reserve(ACME, {P: 1}, resource="r")
    # Calls that are not rate limited (a training job submission) pass.
    guard.reserve(ACME, {UsageKind.TRAINING_WORKER_SECONDS: 0}, resource="job/j", rate_limited=False).release()
    assert len(_published(database)) == 4


def test_a_refused_quota_does_not_spend_a_rate_token(database: Database) -> None:
    clock = Clock()
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 1),), RateLimit(1, 2)), clock=clock)
    with pytest.raises(ResourceExhaustedError, match="quota"):
        guard.reserve(ACME, {P: 5}, resource="r")
    guard.reserve(ACME, {P: 1}, resource="r").commit()
    with pytest.raises(ResourceExhaustedError, match="quota"):
        guard.reserve(ACME, {P: 1}, resource="r")


def test_concurrent_calls_never_go_beyond_the_quota(database: Database) -> None:
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 10),)))
    admitted: list[int] = []
    refused: list[int] = []
    barrier = threading.Barrier(20)

    def call(i: int) -> None:
        barrier.wait()
        try:
            with guard.reserve(ACME, {P: 1}, resource="r"):
                admitted.append(i)
        except ResourceExhaustedError:
            refused.append(i)

    run_in_threads(call, range(20))
    assert (len(admitted), len(refused)) == (10, 10)
    assert sum(u.quantity for u in _published(database)) == 10


def test_plans_from_the_api_are_validated_and_round_trip() -> None:
    plan = Plan(
        "team", (Quota(P, QuotaPeriod.DAY, 5), Quota(UsageKind.INPUT_TOKENS, QuotaPeriod.MONTH, 1e6)), RateLimit(3)
    )
    assert plan_from_proto(plan_to_proto(plan)) == plan
    assert RateLimit(0.5).capacity == 1.0 and RateLimit(3).capacity == 3.0 and RateLimit(3, 7).capacity == 7.0
    with pytest.raises(InvalidArgumentError, match="unknown usage kind 42"):
        plan_from_proto(admin_pb2.Plan(quotas=[admin_pb2.Quota(kind=42, period=admin_pb2.QUOTA_PERIOD_DAY)]))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="unknown quota period 0"):
        plan_from_proto(admin_pb2.Plan(quotas=[admin_pb2.Quota(kind=admin_pb2.USAGE_KIND_PREDICTIONS)]))
    with pytest.raises(InvalidArgumentError, match="zero or more"):
        _guard_plan = Plan("x", (Quota(P, QuotaPeriod.DAY, float("nan")),))
        _guard_plan.validate()
    with pytest.raises(InvalidArgumentError, match="zero or more"):
        guard = QuotaGuard(Plans(Plan()), Used(), None)
        guard.reserve(ACME, {P: -1}, resource="r")


def test_calendar_periods_are_utc() -> None:
    assert period_bounds(QuotaPeriod.HOUR, T0) == (T0.replace(minute=0), T0.replace(minute=0) + timedelta(hours=1))
    december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_bounds(QuotaPeriod.MONTH, december) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )


def test_usage_measured_after_the_work_counts_and_is_refused_once_the_quota_is_used_up(database: Database) -> None:
    tokens = UsageKind.INPUT_TOKENS
    guard = _guard(database, Plan("tokens", (Quota(tokens, QuotaPeriod.DAY, 10),)))
    # Tokens are known only after tokenizing: reserved as 0, committed as counted.
    guard.reserve(ACME, {P: 1, tokens: 0}, resource="deployment/d").commit(measured={tokens: 8})
    guard.reserve(ACME, {P: 1, tokens: 0}, resource="deployment/d").commit(measured={tokens: 5})
    with pytest.raises(ResourceExhaustedError, match="input tokens quota"):
        guard.reserve(ACME, {P: 1, tokens: 0}, resource="deployment/d")
    # A released reservation publishes nothing; each commit published one event: its predictions, and its
    # measured tokens among the event's other kinds.
    assert [_amounts(e) for e in _published(database)] == [
        [(admin_pb2.USAGE_KIND_PREDICTIONS, 1.0), (admin_pb2.USAGE_KIND_INPUT_TOKENS, 8.0)],
        [(admin_pb2.USAGE_KIND_PREDICTIONS, 1.0), (admin_pb2.USAGE_KIND_INPUT_TOKENS, 5.0)],
    ]
    with pytest.raises(InvalidArgumentError):
        guard.reserve(ACME, {P: 1}, resource="deployment/d").commit(measured={tokens: -1})


def test_usage_is_one_event_per_organisation_key_and_resource_with_every_kind_summed(database: Database) -> None:
    recorder = UsageRecorder(database, platform_catalog(), "serving")
    tokens, out = UsageKind.INPUT_TOKENS, UsageKind.OUTPUT_TOKENS
    recorder.record(
        [
            UsageRecord("acme", "k1", P, 2, "deployment/d"),
            UsageRecord("acme", "k1", tokens, 9, "deployment/d"),
            UsageRecord("acme", "k1", P, 1, "deployment/d"),
            UsageRecord("acme", "k1", tokens, 0, "deployment/d"),  # zero usage is no usage
            UsageRecord("acme", "k2", P, 1, "deployment/d"),
            UsageRecord("acme", "k1", out, 4, "deployment/chat"),
            UsageRecord("acme", "k1", P, 0, "deployment/e"),  # nothing used: no event at all
        ]
    )
    assert [(e.api_key_id, e.resource, _amounts(e)) for e in _published(database)] == [
        ("k1", "deployment/d", [(P.value, 3.0), (tokens.value, 9.0)]),
        ("k2", "deployment/d", [(P.value, 1.0)]),
        ("k1", "deployment/chat", [(out.value, 4.0)]),
    ]


# -- the event-loop path: inline decisions, background refresh, group commit -----------------------------------


class Aggregated(UsageSource):
    """What the admin's aggregator knows: the usage events committed to ``databases`` (every replica's outbox),
    summed, as the metering service would answer once they were relayed and aggregated."""

    def __init__(self, *databases: Database) -> None:
        self.databases = databases
        self.calls = 0

    def used(self, organization_id: str, kind: UsageKind, start: datetime, end: datetime) -> float:
        self.calls += 1
        return sum(_total(db, kind) for db in self.databases)


def test_after_the_first_call_the_guard_decides_without_asking(database: Database) -> None:
    used = Used()
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 3),)), used)
    # Nothing known yet: the event loop must not decide (the caller goes to a worker thread).
    assert guard.try_reserve(ACME, {P: 1}, resource="r") is None
    guard.reserve(ACME, {P: 1}, resource="r").commit()
    asked = len(used.asked)
    for _ in range(2):
        reservation = guard.try_reserve(ACME, {P: 1}, resource="r")
        assert reservation is not None
        reservation.commit()
    with pytest.raises(ResourceExhaustedError, match="0 of 3 left"):
        guard.try_reserve(ACME, {P: 1}, resource="r")
    assert len(used.asked) == asked  # no network round trip on the inline path
    # Another organisation, or the next period, needs the sources again.
    other = Principal("globex", "k2", frozenset({"serving:predict"}))
    assert guard.try_reserve(other, {P: 1}, resource="r") is None


def test_refresh_raises_counters_to_the_admins_total_and_never_lowers_them(tmp_path: Path) -> None:
    first, second = (Database(f"sqlite:///{tmp_path / name}.db") for name in ("a", "b"))
    for db in (first, second):
        db.create_all()
    clock = Clock()
    plan = Plan("team", (Quota(P, QuotaPeriod.DAY, 10),))
    aggregated = Aggregated(first, second)
    replicas = [
        QuotaGuard(
            Plans(plan),
            aggregated,
            UsageRecorder(db, platform_catalog(), "serving"),
            clock=clock,
            monotonic=lambda: clock.mono,
        )
        for db in (first, second)
    ]
    a, b = replicas
    for _ in range(6):
        a.reserve(ACME, {P: 1}, resource="r").commit()
    # b saw the 6 at its first look, a has the 6 it counted itself.
    b.reserve(ACME, {P: 1}, resource="r").commit()
    b.reserve(ACME, {P: 1}, resource="r").commit()
    # a does not know b's 2 yet: it admits 4 more (a lower bound never refuses below the quota) ...
    assert a.try_reserve(ACME, {P: 4}, resource="r") is not None
    # ... until its refresh reads the admin's total, 8 committed, plus the 4 it holds reserved.
    a.refresh()
    with pytest.raises(ResourceExhaustedError, match="0 of 10 left"):
        a.try_reserve(ACME, {P: 1}, resource="r")
    # The admin's total lagging behind a replica's own count never lowers it (exact for one replica).
    b.reserve(ACME, {P: 1}, resource="r").release()
    aggregated.databases = ()
    b.refresh()
    with pytest.raises(ResourceExhaustedError):
        b.try_reserve(ACME, {P: 3}, resource="r")
    for db in (first, second):
        db.dispose()


def test_two_replicas_admit_between_the_quota_and_the_documented_bound(tmp_path: Path) -> None:
    """R = 2 replicas, each refreshing after every ``per_refresh`` admissions: the second admits at most what the
    first admitted since its last refresh beyond the quota, N + (R - 1) x per_refresh, and never refuses below N."""
    quota, per_refresh = 40, 5
    dbs = [Database(f"sqlite:///{tmp_path / f'r{i}'}.db") for i in range(2)]
    for db in dbs:
        db.create_all()
    clock = Clock()
    aggregated = Aggregated(*dbs)
    guards = [
        QuotaGuard(
            Plans(Plan("team", (Quota(P, QuotaPeriod.DAY, quota),))),
            aggregated,
            UsageRecorder(db, platform_catalog(), "serving"),
            clock=clock,
            monotonic=lambda: clock.mono,
        )
        for db in dbs
    ]
    admitted = 0
    refused_at: list[int] = []
    for turn in range(200):
        guard = guards[turn % 2]
        try:
            guard.reserve(ACME, {P: 1}, resource="r").commit()
            admitted += 1
        except ResourceExhaustedError:
            refused_at.append(admitted)
        if turn % (2 * per_refresh) == 2 * per_refresh - 1:
            for g in guards:
                g.refresh()
    assert quota <= admitted <= quota + (2 - 1) * per_refresh
    assert min(refused_at) >= quota  # nobody was refused while the quota had room
    assert aggregated.used("acme", P, T0, T0) == admitted  # usage totals equal the admitted calls
    for db in dbs:
        db.dispose()


async def test_calls_finishing_together_share_one_commit_and_one_event(database: Database) -> None:
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 1000),)))
    guard.reserve(ACME, {P: 1}, resource="deployment/d").commit()  # seeds the counters: the rest run inline
    assert guard.recorder is not None

    async def call() -> None:
        reservation = await guard.reserve_async(ACME, {P: 1, UsageKind.INPUT_TOKENS: 0}, resource="deployment/d")
        await reservation.commit_async(measured={UsageKind.INPUT_TOKENS: 7})

    await asyncio.gather(*(call() for _ in range(50)))
    recorder = guard.recorder
    assert recorder.grouped_calls == 50
    # The 50 calls finished in the same turn of the event loop: one transaction for all of them.
    assert recorder.group_commits == 1
    published = _published(database)
    assert len(published) == 1 + 1  # the seeding call's, then one event for the 50, every kind in it
    assert _amounts(published[1]) == [
        (admin_pb2.USAGE_KIND_PREDICTIONS, 50.0),
        (admin_pb2.USAGE_KIND_INPUT_TOKENS, 350.0),
    ]
    assert _total(database, P) == 51
    assert _total(database, UsageKind.INPUT_TOKENS) == 50 * 7
    with pytest.raises(ResourceExhaustedError, match="949 of 1000 left, this call needs 950"):
        guard.try_reserve(ACME, {P: 950}, resource="deployment/d")


async def test_a_failed_group_commit_fails_every_call_of_it_and_counts_nothing(database: Database) -> None:
    guard = _guard(database, Plan("team", (Quota(P, QuotaPeriod.DAY, 10),)))
    guard.reserve(ACME, {P: 1}, resource="r").commit()
    reservations = [await guard.reserve_async(ACME, {P: 1}, resource="r") for _ in range(3)]
    database.dispose()
    Path(database.engine.url.database or "").unlink()
    (Path(database.engine.url.database or "")).mkdir()  # the file is now a directory: every write fails
    results = await asyncio.gather(*(r.commit_async() for r in reservations), return_exceptions=True)
    assert all(isinstance(r, UnavailableError) for r in results), results
    assert "could not record the usage of this call" in str(results[0])
    # Released, not counted: 9 of 10 are still left.
    assert guard.try_reserve(ACME, {P: 9}, resource="r") is not None
