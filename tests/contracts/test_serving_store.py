"""Serving store contract: ``gristmill.serving.domain.ports.DeploymentStore`` behaves the same on SQLite and
PostgreSQL (``database_url`` is a fresh, empty database of each).

Deployments (create, conflicts, get, update, delete, listing by name across pages and organisations) with
everything their spec routes by (target version or alias, canary and its weight, batching, quantisation,
length and logging policies), and the applied alias sequences: a compare-and-set in the caller's
transaction, rolled back with it, that an older or concurrent event never moves back (the same sequence
applies again: replicas sharing the store each apply every event).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gristmill.core.errors import AlreadyExistsError, NotFoundError
from gristmill.core.sql import Database
from gristmill.serving.domain.model import (
    BatchingConfig,
    CanaryRoute,
    DeploymentSpec,
    LengthPolicy,
    OverLengthAction,
    PredictionLoggingConfig,
    Quantization,
    VersionSelector,
)
from gristmill.serving.domain.ports import DeploymentStore
from gristmill.serving.store.sql import SqlDeploymentStore
from tests.support.databases import migrated_database

T0 = datetime(2026, 3, 1, 9, 15, tzinfo=UTC)
ORG = "acme"


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = migrated_database(database_url, "serving")
    yield database
    database.dispose()


@pytest.fixture
def store(database: Database) -> SqlDeploymentStore:
    return SqlDeploymentStore(database)


def _spec(name: str = "sentiment", org: str = ORG, **fields: object) -> DeploymentSpec:
    base = DeploymentSpec(
        organization_id=org, name=name, registered_model_name="reviews", create_time=T0, update_time=T0
    )
    return replace(base, **fields)  # type: ignore[arg-type]


FULL = _spec(
    "full",
    target=VersionSelector.of_version(3),
    canary=CanaryRoute(VersionSelector.of_alias("challenger"), 0.125),
    batching=BatchingConfig(max_batch_size=16, max_delay_ms=7, max_queue_size=640),
    quantization=Quantization.DYNAMIC_INT8,
    length_policy=LengthPolicy(256, OverLengthAction.REJECT),
    prediction_logging=PredictionLoggingConfig(sample_rate=0.05, uncertainty_threshold=0.6),
)


# -- deployments --------------------------------------------------------------------------------------------


def test_a_deployment_round_trips_whole(store: DeploymentStore) -> None:
    store.create(FULL)
    got = store.get(ORG, "full")
    assert got == FULL
    assert got.canary is not None and got.canary.weight == 0.125 and got.canary.target.alias == "challenger"
    assert got.create_time.utcoffset() == timedelta(0)
    store.create(_spec())  # the defaults: the production alias, no canary
    assert store.get(ORG, "sentiment") == _spec()
    ensemble = _spec("ensemble", target=VersionSelector.of_version(1), ensemble=(4, 2, 3))
    store.create(ensemble)
    assert store.get(ORG, "ensemble").ensemble == (4, 2, 3)  # in the order given
    with pytest.raises(NotFoundError, match="'missing' does not exist"):
        store.get(ORG, "missing")
    with pytest.raises(NotFoundError):
        store.get("other", "full")  # names belong to their organisation


def test_times_in_any_zone_are_the_same_instants(store: DeploymentStore) -> None:
    zone = timezone(timedelta(hours=-7))
    store.create(_spec(create_time=T0.astimezone(zone), update_time=(T0 + timedelta(hours=1)).astimezone(zone)))
    got = store.get(ORG, "sentiment")
    assert (got.create_time, got.update_time) == (T0, T0 + timedelta(hours=1))
    store.update(_spec(update_time=(T0 + timedelta(hours=2)).astimezone(zone)))
    assert store.get(ORG, "sentiment").update_time == T0 + timedelta(hours=2)


def test_a_name_is_taken_once_per_organisation(store: DeploymentStore) -> None:
    store.create(_spec())
    with pytest.raises(AlreadyExistsError, match="'sentiment' already exists"):
        store.create(_spec(target=VersionSelector.of_version(9)))
    assert store.get(ORG, "sentiment").target == VersionSelector.of_alias("production")
    store.create(_spec(org="other"))
    assert [s.organization_id for s in store.list_all()] == [ORG, "other"]


def test_an_update_replaces_the_spec_and_keeps_the_creation_time(store: DeploymentStore) -> None:
    store.create(_spec())
    later = T0 + timedelta(minutes=5)
    # A canary starts, its weight moves, the target moves to a version, then the canary ends.
    for canary, target in (
        (CanaryRoute(VersionSelector.of_version(2), 0.1), VersionSelector.of_alias("production")),
        (CanaryRoute(VersionSelector.of_version(2), 0.5), VersionSelector.of_alias("production")),
        (None, VersionSelector.of_version(2)),
    ):
        wanted = _spec(canary=canary, target=target, update_time=later, create_time=later)
        store.update(wanted)
        got = store.get(ORG, "sentiment")
        assert (got.canary, got.target, got.update_time) == (canary, target, later)
        assert got.create_time == T0  # the creation time is the store's, not the update's
    with pytest.raises(NotFoundError, match="'missing' does not exist"):
        store.update(_spec("missing"))


def test_delete(store: DeploymentStore) -> None:
    store.create(_spec())
    store.create(_spec(org="other"))
    store.delete(ORG, "sentiment")
    with pytest.raises(NotFoundError):
        store.get(ORG, "sentiment")
    with pytest.raises(NotFoundError, match="'sentiment' does not exist"):
        store.delete(ORG, "sentiment")
    assert store.get("other", "sentiment") == _spec(org="other")
    store.create(_spec(target=VersionSelector.of_version(4)))  # the name is free again
    assert store.get(ORG, "sentiment").target.version == 4


def test_listing_is_by_name_across_pages(store: DeploymentStore) -> None:
    names = ["b", "a-c", "ab", "a.b", "a_b", "a1", "z9"]
    for name in names:
        store.create(_spec(name))
    store.create(_spec("m", org="other"))
    listed: list[str] = []
    after = ""
    while page := store.list_page(ORG, after=after, limit=3):
        assert len(page) <= 3
        listed.extend(s.name for s in page)
        after = page[-1].name
    assert listed == sorted(names)
    assert [s.name for s in store.list_page(ORG, limit=100)] == sorted(names)
    assert [s.name for s in store.list_page(ORG, after="a_b")] == [n for n in sorted(names) if n > "a_b"]
    assert store.list_page("nobody") == []
    everything = store.list_all()
    assert [(s.organization_id, s.name) for s in everything] == [(ORG, n) for n in sorted(names)] + [("other", "m")]
    assert everything[0] == _spec(sorted(names)[0])


# -- applied alias sequences --------------------------------------------------------------------------------


def _apply(database: Database, store: DeploymentStore, sequence: int, alias: str = "production") -> bool:
    with database.transaction() as session:
        return store.apply_alias_sequence(session, ORG, "reviews", alias, sequence)


def test_an_older_sequence_never_applies(store: DeploymentStore, database: Database) -> None:
    assert _apply(database, store, 5)
    # The same event again: another replica sharing the store applies it too (a redelivery to one replica is
    # skipped by its consumer group before the handler asks).
    assert _apply(database, store, 5)
    assert not _apply(database, store, 4)  # an older event
    assert _apply(database, store, 6)
    assert not _apply(database, store, 5)
    # Sequences are kept per organisation, model and alias.
    assert _apply(database, store, 1, alias="staging")
    with database.transaction() as session:
        assert store.apply_alias_sequence(session, "other", "reviews", "production", 1)
        assert store.apply_alias_sequence(session, ORG, "other-model", "production", 1)
        # Twice in one transaction: the second sees the first.
        assert store.apply_alias_sequence(session, ORG, "third", "production", 3)
        assert not store.apply_alias_sequence(session, ORG, "third", "production", 2)
        assert store.apply_alias_sequence(session, ORG, "third", "production", 4)


def test_sequences_beyond_32_bits(store: DeploymentStore, database: Database) -> None:
    big = 2**40 + 7
    assert _apply(database, store, big)
    assert not _apply(database, store, big - 1)
    assert not _apply(database, store, 2**31 + 1)
    assert _apply(database, store, big + 1)


def test_an_applied_sequence_rolls_back_with_the_transaction(store: DeploymentStore, database: Database) -> None:
    assert _apply(database, store, 3)
    with pytest.raises(RuntimeError), database.transaction() as session:
        assert store.apply_alias_sequence(session, ORG, "reviews", "production", 9)
        assert store.apply_alias_sequence(session, ORG, "reviews", "canary", 1)
        raise RuntimeError("the handler failed")
    assert _apply(database, store, 4)  # 9 was never applied
    assert _apply(database, store, 1, alias="canary")


def test_concurrent_events_never_move_the_sequence_back(store: DeploymentStore, database: Database) -> None:
    """Events of one alias handled at once (a rebalance): every one applies or not atomically, and the newest
    always ends applied, whatever order the transactions commit in. Two rounds: the alias is new, then it has
    a sequence."""
    barrier = threading.Barrier(12)
    applied: list[int] = []
    errors: list[BaseException] = []

    def handle(sequence: int) -> None:
        try:
            with database.transaction() as session:
                barrier.wait()
                if store.apply_alias_sequence(session, ORG, "reviews", "production", sequence):
                    applied.append(sequence)
        except BaseException as exc:
            errors.append(exc)

    for sequences in (range(1, 13), range(13, 25)):
        threads = [threading.Thread(target=handle, args=(s,)) for s in sequences]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert max(sequences) in applied
        assert not _apply(database, store, max(sequences) - 1)  # nothing older overwrote the newest
        assert _apply(database, store, max(sequences))
    assert _apply(database, store, 25)
