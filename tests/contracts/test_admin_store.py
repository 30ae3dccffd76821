"""Admin store contract: ``gristmill.admin.domain.ports.AdminStore`` behaves the same on SQLite and PostgreSQL
(``database_url`` is a fresh, empty database of each).

Organisations (create, conflicts, plans, paging by id), API keys (hash only, newest first across pages,
revocation that only ever moves earlier, rotation in one transaction, last use), and hourly usage totals
(added in the consumer's transaction and rolled back with it, filtered by key, kind and range, and summed
by the metering domain per hour, day and month).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gristmill.admin.domain.admin import Admin
from gristmill.admin.domain.metering import Metering
from gristmill.admin.domain.model import ApiKey, Granularity, Organization, UsageBucket, UsageQuery
from gristmill.admin.domain.ports import AdminStore
from gristmill.admin.store.sql import SqlAdminStore
from gristmill.core.auth import ADMIN, Principal
from gristmill.core.auth_quota import Plan, Quota, QuotaPeriod, RateLimit, UsageKind
from gristmill.core.errors import AlreadyExistsError
from gristmill.core.paging import Page
from gristmill.core.sql import Database
from tests.support.databases import migrated_database

T0 = datetime(2026, 11, 10, 12, 30, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
UNLIMITED = Plan()
PLAN = Plan(
    name="team",
    quotas=(
        Quota(UsageKind.PREDICTIONS, QuotaPeriod.DAY, 1000.0),
        Quota(UsageKind.TRAINING_WORKER_SECONDS, QuotaPeriod.MONTH, 3600.5),
    ),
    prediction_rate_limit=RateLimit(12.5, 20),
)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = migrated_database(database_url, "admin")
    yield database
    database.dispose()


@pytest.fixture
def store(database: Database) -> SqlAdminStore:
    return SqlAdminStore(database)


def _org(organization_id: str, plan: Plan = UNLIMITED, at: datetime = T0) -> Organization:
    return Organization(organization_id, f"{organization_id} inc.", plan, at)


def _key(api_key_id: str, org: str = "acme", *, minutes: int = 0, **fields: object) -> ApiKey:
    return ApiKey(
        api_key_id=api_key_id,
        organization_id=org,
        display_name=f"key {api_key_id}",
        scopes=frozenset({"admin", "serving:predict"}),
        secret_prefix=api_key_id[:8],
        create_time=T0 + timedelta(minutes=minutes),
        **fields,  # type: ignore[arg-type]
    )


def _pages_of_orgs(store: AdminStore, size: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        items, after = store.list_organizations(Page(size=size, after=after))
        pages.append([o.organization_id for o in items])
        if after is None:
            return pages


def _pages_of_keys(store: AdminStore, org: str, size: int, revoked_before: datetime | None = None) -> list[list[str]]:
    pages, after = [], None
    while True:
        items, after = store.list_keys(org, include_revoked_before=revoked_before, page=Page(size=size, after=after))
        pages.append([k.api_key_id for k in items])
        if after is None:
            return pages


# -- organisations ------------------------------------------------------------------------------------------


def test_organisations_are_unique_and_round_trip_with_their_plan(store: AdminStore) -> None:
    created = store.insert_organization(_org("acme", PLAN))
    with pytest.raises(AlreadyExistsError, match="'acme' already exists"):
        store.insert_organization(_org("acme"))
    got = store.get_organization("acme")
    assert got == created and got.plan == PLAN and got.display_name == "acme inc."
    assert got.create_time == T0 and got.create_time.utcoffset() == timedelta(0)
    assert store.get_organization("missing") is None
    # A creation time in another zone is the same instant.
    store.insert_organization(_org("zoned", at=T0.astimezone(PLUS_TWO)))
    zoned = store.get_organization("zoned")
    assert zoned is not None and zoned.create_time == T0


def test_a_plan_is_replaced_whole(store: AdminStore) -> None:
    store.insert_organization(_org("acme", PLAN))
    updated = store.set_plan("acme", Plan(name="free"))
    assert updated is not None and updated.plan == Plan(name="free")
    got = store.get_organization("acme")
    assert got is not None and got.plan == Plan(name="free") and got.create_time == T0
    assert store.set_plan("missing", PLAN) is None


def test_organisations_are_listed_by_id_across_pages(store: AdminStore) -> None:
    ids = ["b", "a-c", "ab", "a.b", "a_b", "a1", "root", "z9"]
    for organization_id in ids:
        store.insert_organization(_org(organization_id))
    pages = _pages_of_orgs(store, 3)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [o for page in pages for o in page] == sorted(ids)
    assert _pages_of_orgs(store, 8) == [sorted(ids)]
    assert _pages_of_orgs(store, 100) == [sorted(ids)]


def test_no_organisations_is_one_empty_page(store: AdminStore) -> None:
    assert store.list_organizations(Page(size=5)) == ([], None)


# -- API keys -----------------------------------------------------------------------------------------------


def test_a_key_is_stored_with_its_hash_and_round_trips(store: AdminStore) -> None:
    key = _key("k1", expire_time=T0 + timedelta(days=30), rotated_from_api_key_id="k0")
    assert store.insert_key(key, "salt$hash") == key
    stored = store.get_key("k1")
    assert stored is not None and stored.key == key and stored.secret_hash == "salt$hash"
    assert stored.key.expire_time is not None and stored.key.expire_time.utcoffset() == timedelta(0)
    assert store.get_key("missing") is None
    with pytest.raises(AlreadyExistsError, match="k1"):
        store.insert_key(_key("k1", "other"), "x")
    assert store.count_keys("other") == 0


def test_keys_are_listed_newest_first_across_pages_and_counted(store: AdminStore) -> None:
    for i in range(7):
        store.insert_key(_key(f"k{i}", minutes=i), "h")
    store.insert_key(_key("elsewhere", "other"), "h")
    pages = _pages_of_keys(store, "acme", 3)
    assert pages == [["k6", "k5", "k4"], ["k3", "k2", "k1"], ["k0"]]
    assert _pages_of_keys(store, "acme", 7) == [["k6", "k5", "k4", "k3", "k2", "k1", "k0"]]
    assert _pages_of_keys(store, "nobody", 3) == [[]]
    store.revoke_key("k3", T0)
    assert store.count_keys("acme") == 7 and store.count_keys("other") == 1


def test_revoked_keys_leave_the_listing_once_revoked_by_the_given_time(store: AdminStore) -> None:
    for i in range(4):
        store.insert_key(_key(f"k{i}", minutes=i), "h")
    store.revoke_key("k1", T0)
    store.revoke_key("k2", T0 + timedelta(hours=1))  # scheduled: a rotation's grace period
    assert _pages_of_keys(store, "acme", 10) == [["k3", "k2", "k1", "k0"]]
    assert _pages_of_keys(store, "acme", 10, revoked_before=T0) == [["k3", "k2", "k0"]]
    assert _pages_of_keys(store, "acme", 2, revoked_before=T0) == [["k3", "k2"], ["k0"]]
    later = T0 + timedelta(hours=1)
    assert _pages_of_keys(store, "acme", 10, revoked_before=later) == [["k3", "k0"]]
    # The same instant written in another zone filters the same keys.
    assert _pages_of_keys(store, "acme", 10, revoked_before=later.astimezone(PLUS_TWO)) == [["k3", "k0"]]


def test_revocation_only_moves_earlier_and_is_idempotent(store: AdminStore) -> None:
    store.insert_key(_key("k1"), "h")
    later = T0 + timedelta(hours=2)
    first = store.revoke_key("k1", later)
    assert first is not None and first.revoke_time == later
    again = store.revoke_key("k1", later + timedelta(hours=1))
    assert again is not None and again.revoke_time == later  # already revoked by then: unchanged
    earlier = store.revoke_key("k1", T0.astimezone(PLUS_TWO))
    assert earlier is not None and earlier.revoke_time == T0 and earlier.revoke_time.utcoffset() == timedelta(0)
    stored = store.get_key("k1")
    assert stored is not None and stored.key.revoke_time == T0
    assert store.revoke_key("missing", T0) is None


def test_rotation_schedules_the_old_revocation_and_adds_the_new_key(store: AdminStore) -> None:
    store.insert_key(_key("old"), "h-old")
    grace_end = T0 + timedelta(hours=24)
    new = _key("new", minutes=1, rotated_from_api_key_id="old")
    assert store.rotate_key("old", grace_end, new, "h-new") == new
    old = store.get_key("old")
    got = store.get_key("new")
    assert old is not None and old.key.revoke_time == grace_end
    assert got is not None and got.key == new and got.secret_hash == "h-new"
    # A later rotation never pushes an earlier revocation back.
    store.rotate_key("old", grace_end + timedelta(days=1), _key("newer", minutes=2), "h")
    old = store.get_key("old")
    assert old is not None and old.key.revoke_time == grace_end
    assert _pages_of_keys(store, "acme", 10) == [["newer", "new", "old"]]


def test_a_failed_rotation_changes_nothing(store: AdminStore) -> None:
    store.insert_key(_key("old"), "h")
    store.insert_key(_key("taken", minutes=1), "h")
    with pytest.raises(AlreadyExistsError, match="taken"):
        store.rotate_key("old", T0, _key("taken", minutes=2), "h2")
    old = store.get_key("old")
    taken = store.get_key("taken")
    assert old is not None and old.key.revoke_time is None  # rolled back with the failed insert
    assert taken is not None and taken.secret_hash == "h" and store.count_keys("acme") == 2


def test_touch_records_the_last_use(store: AdminStore) -> None:
    store.insert_key(_key("k1"), "h")
    store.touch_key("k1", T0 + timedelta(minutes=5))
    store.touch_key("k1", (T0 + timedelta(minutes=9)).astimezone(PLUS_TWO))
    store.touch_key("missing", T0)  # nothing to record
    stored = store.get_key("k1")
    assert stored is not None and stored.key.last_used_time == T0 + timedelta(minutes=9)


# -- usage --------------------------------------------------------------------------------------------------


def _add(
    store: AdminStore, database: Database, *rows: tuple[str, str, UsageKind, datetime, float], fail: bool = False
) -> None:
    with database.transaction() as session:
        for org, key, kind, hour, quantity in rows:
            store.add_usage(session, org, key, kind, hour, quantity)
        if fail:
            raise RuntimeError("the consumer's transaction failed")


H = T0.replace(minute=0)


def test_usage_adds_up_per_hour_key_and_kind(store: AdminStore, database: Database) -> None:
    p, t = UsageKind.PREDICTIONS, UsageKind.INPUT_TOKENS
    # Twice the same hour in one transaction, then again in another: one bucket.
    _add(store, database, ("acme", "k1", p, H, 1.0), ("acme", "k1", p, H, 2.0), ("acme", "k1", t, H, 40.0))
    _add(store, database, ("acme", "k1", p, H, 0.5), ("acme", "", p, H, 4.0), ("acme", "k2", p, H, 8.0))
    _add(store, database, ("acme", "k1", p, H + timedelta(hours=1), 16.0), ("other", "k1", p, H, 32.0))
    buckets = store.usage("acme", api_key_id="", kinds=[], start=H, end=H + timedelta(days=1))
    # By hour, then kind, then key.
    assert buckets == [
        UsageBucket("k1", t, H, 40.0),
        UsageBucket("", p, H, 4.0),
        UsageBucket("k1", p, H, 3.5),
        UsageBucket("k2", p, H, 8.0),
        UsageBucket("k1", p, H + timedelta(hours=1), 16.0),
    ]
    assert all(b.hour_start.utcoffset() == timedelta(0) for b in buckets)
    of_k1 = store.usage("acme", api_key_id="k1", kinds=[p], start=H, end=H + timedelta(days=1))
    assert of_k1 == [UsageBucket("k1", p, H, 3.5), UsageBucket("k1", p, H + timedelta(hours=1), 16.0)]
    # The range is [start, end): the end hour is out, the start hour in, whatever zone they are written in.
    first_hour = store.usage("acme", api_key_id="k1", kinds=[p, t], start=H, end=H + timedelta(hours=1))
    assert first_hour == [UsageBucket("k1", t, H, 40.0), UsageBucket("k1", p, H, 3.5)]
    zoned = store.usage(
        "acme",
        api_key_id="k1",
        kinds=[p],
        start=H.astimezone(PLUS_TWO),
        end=(H + timedelta(hours=1)).astimezone(PLUS_TWO),
    )
    assert zoned == [UsageBucket("k1", p, H, 3.5)]
    assert store.usage("nobody", api_key_id="", kinds=[], start=H, end=H + timedelta(days=1)) == []


def test_usage_rolls_back_with_the_consumer_transaction(store: AdminStore, database: Database) -> None:
    p = UsageKind.PREDICTIONS
    _add(store, database, ("acme", "k1", p, H, 1.0))
    with pytest.raises(RuntimeError):
        _add(store, database, ("acme", "k1", p, H, 10.0), ("acme", "k2", p, H, 10.0), fail=True)
    assert store.usage("acme", api_key_id="", kinds=[], start=H, end=H + timedelta(hours=1)) == [
        UsageBucket("k1", p, H, 1.0)
    ]


def test_concurrent_consumers_lose_no_usage(store: AdminStore, database: Database) -> None:
    """Additions to one hour from concurrent transactions (a rebalance, two partitions of one key): none is
    lost, and the first additions to a new hour do not collide. Two rounds: the hour is new, then it exists."""
    p = UsageKind.PREDICTIONS
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        try:
            with database.transaction() as session:
                barrier.wait()
                for _ in range(5):
                    store.add_usage(session, "acme", "k1", p, H, float(i + 1))
        except BaseException as exc:
            errors.append(exc)

    for round_ in (1, 2):
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        [bucket] = store.usage("acme", api_key_id="k1", kinds=[p], start=H, end=H + timedelta(hours=1))
        assert bucket.quantity == round_ * 5 * sum(range(1, 7))


def test_large_totals_keep_their_value(store: AdminStore, database: Database) -> None:
    t = UsageKind.INPUT_TOKENS
    _add(store, database, ("acme", "k1", t, H, 3_000_000_000.0), ("acme", "k1", t, H, 0.25))
    [bucket] = store.usage("acme", api_key_id="k1", kinds=[t], start=H, end=H + timedelta(hours=1))
    assert bucket.quantity == 3_000_000_000.25


def test_hourly_buckets_sum_by_granularity(store: AdminStore, database: Database, tmp_path: Path) -> None:
    """The metering domain over this store: hours become hours, days and months (UTC calendar periods)."""
    admin = Admin(store, root_organization_id="root", clock=lambda: T0)
    store.insert_organization(_org("root"))
    store.insert_organization(_org("acme"))
    metering = Metering(store, admin, clock=lambda: T0)
    caller = Principal("root", "0000000000000000", frozenset({ADMIN}))
    p = UsageKind.PREDICTIONS
    start = datetime(2026, 10, 31, 22, tzinfo=UTC)
    hours = [start, start + timedelta(hours=1), start + timedelta(hours=2), start + timedelta(hours=26)]
    _add(store, database, *[("acme", "k1", p, hour, float(2**i)) for i, hour in enumerate(hours)])
    _add(store, database, ("acme", "k2", p, hours[2], 100.0))
    end = datetime(2026, 11, 3, tzinfo=UTC)

    def totals(granularity: Granularity, *, by_key: bool = False) -> list[tuple[datetime, str, float]]:
        query = UsageQuery("acme", kinds=(p,), start=start, end=end, granularity=granularity, group_by_api_key=by_key)
        return [(t.period_start, t.api_key_id, t.quantity) for t in metering.usage(caller, query)]

    nov1 = datetime(2026, 11, 1, tzinfo=UTC)
    assert totals(Granularity.NONE) == [(start, "", 115.0)]
    assert totals(Granularity.HOUR) == [
        (hours[0], "", 1.0),
        (hours[1], "", 2.0),
        (hours[2], "", 104.0),
        (hours[3], "", 8.0),
    ]
    assert totals(Granularity.DAY) == [(start, "", 3.0), (nov1, "", 104.0), (nov1 + timedelta(days=1), "", 8.0)]
    assert totals(Granularity.MONTH) == [(start, "", 3.0), (nov1, "", 112.0)]
    assert totals(Granularity.MONTH, by_key=True) == [(start, "k1", 3.0), (nov1, "k1", 12.0), (nov1, "k2", 100.0)]
