"""Aliases: set, move, delete with compare-and-set; the history (who, when, from → to, why); an
``alias changed`` event per change with the history's sequence; concurrent moves lose nothing."""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from pathlib import Path

import pytest

from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.core.errors import AbortedError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.registry.domain.model import AliasCause, Caller
from gristmill.registry.domain.registration import Registration
from services.registry.tests.support import CALLER, Env, draft, make_env, register_ready, upload_model
from tests.support.concurrency import run_in_threads


def test_set_move_delete_and_history(env: Env) -> None:
    for _ in range(2):
        register_ready(env, "m")
    bob = Caller(actor="bob")
    created, changed = env.registry.promotions.set_alias(
        CALLER, "m", "production", 1, reason="first release", expected=0
    )
    assert changed and created is not None
    moved, _ = env.registry.promotions.set_alias(bob, "m", "production", 2, reason="better", expected=1)
    same, unchanged = env.registry.promotions.set_alias(bob, "m", "production", 2, reason="again", expected=None)
    assert not unchanged and same == moved  # a no-op returns the latest entry and writes nothing
    deleted = env.registry.promotions.delete_alias(CALLER, "m", "production", reason="retired", expected=2)

    assert env.registry.catalog.get_model(CALLER, "m").aliases == {}
    history, token = env.registry.promotions.alias_history(CALLER, "m", "production", 0, "")
    assert token == ""
    assert [(c.sequence, c.from_version, c.to_version, c.actor, c.reason, c.cause) for c in history] == [
        (3, 2, None, "alice", "retired", AliasCause.MANUAL),
        (2, 1, 2, "bob", "better", AliasCause.MANUAL),
        (1, None, 1, "alice", "first release", AliasCause.MANUAL),
    ]
    assert history[0].change_time > history[1].change_time > history[2].change_time
    assert deleted == history[0]

    events = [payload for _, payload in env.events(events_pb2.AliasChanged)]
    assert [(e.sequence, e.HasField("from_version"), e.to_version, e.actor) for e in events] == [
        (1, False, 1, "alice"),
        (2, True, 2, "bob"),
        (3, True, 0, "alice"),
    ]
    assert not events[2].HasField("to_version") and events[2].cause == registry_pb2.ALIAS_CHANGE_CAUSE_MANUAL


def test_resolution_by_alias_and_latest(env: Env) -> None:
    register_ready(env, "m")
    register_ready(env, "m")
    env.registry.promotions.set_alias(CALLER, "m", "staging", 1, reason="", expected=None)
    assert env.registry.catalog.get_version(CALLER, "m", version=None, alias="staging").version == 1
    assert env.registry.catalog.get_version(CALLER, "m", version=None, alias=None).version == 2
    assert env.registry.catalog.get_version(CALLER, "m", version=1, alias=None).aliases == ("staging",)
    assert env.registry.catalog.download_manifest(CALLER, "m", version=None, alias="staging").version == 1


def test_alias_refusals(env: Env) -> None:
    register_ready(env, "m")
    manifest = upload_model(env.objects, "jobs/pending")
    env.registry.registrations.register_version(
        CALLER, Registration("m", True, draft(manifest, "jobs/pending")), wait=False
    )
    env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="", expected=None)
    cases = [
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "production", 2, reason="", expected=None),
            FailedPreconditionError,
            "is PENDING",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "production", 9, reason="", expected=None),
            NotFoundError,
            "version 9",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "nope", "production", 1, reason="", expected=None),
            NotFoundError,
            "'nope' does not exist",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="", expected=0),
            AbortedError,
            "points to version 1, not nothing",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "1st", 1, reason="", expected=None),
            InvalidArgumentError,
            "must start with a letter",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "Prod!", 1, reason="", expected=None),
            InvalidArgumentError,
            "alias 'Prod!' is not valid",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "production", 0, reason="", expected=None),
            InvalidArgumentError,
            "positive",
        ),
        (
            lambda: env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="", expected=-1),
            InvalidArgumentError,
            "expected_current_version",
        ),
        (
            lambda: env.registry.promotions.delete_alias(CALLER, "m", "staging", reason="", expected=None),
            NotFoundError,
            "alias 'staging'",
        ),
        (
            lambda: env.registry.promotions.delete_alias(CALLER, "m", "production", reason="", expected=3),
            AbortedError,
            "moved meanwhile",
        ),
        (
            lambda: env.registry.catalog.get_version(CALLER, "m", version=None, alias="staging"),
            NotFoundError,
            "alias 'staging'",
        ),
        (lambda: env.registry.promotions.alias_history(CALLER, "nope", "", 0, ""), NotFoundError, "'nope'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    history, _ = env.registry.promotions.alias_history(CALLER, "m", "", 0, "")
    assert len(history) == 1 and len(env.events(events_pb2.AliasChanged)) == 1  # refusals wrote nothing


def test_two_racing_compare_and_sets_exactly_one_wins(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    for _ in range(3):
        register_ready(env, "m")
    env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="", expected=None)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def move(target: int) -> None:
        barrier.wait()
        try:
            env.registry.promotions.set_alias(CALLER, "m", "production", target, reason="race", expected=1)
            outcomes.append("won")
        except AbortedError:
            outcomes.append("aborted")

    run_in_threads(move, (2, 3))
    assert sorted(outcomes) == ["aborted", "won"]


def test_concurrent_moves_from_two_processes_lose_no_update(tmp_path: Path, database_url: str) -> None:
    """Eight threads over two registries (two engines, as two processes would be) on one database (a SQLite
    file, and PostgreSQL) each move the alias with compare-and-set,
    retrying when they lose. Every success must be in the history, in one unbroken chain (each entry starts
    where the previous ended), with one event each."""
    first = make_env(tmp_path, database_url=database_url)
    second = make_env(tmp_path, database_url=database_url)  # the same database, its own engine and connections
    m = f"m-{uuid.uuid4().hex[:8]}"
    for _ in range(4):
        register_ready(first, m)
    first.registry.promotions.set_alias(CALLER, m, "production", 1, reason="start", expected=None)
    moves_per_thread = 6
    wins: list[int] = []
    aborts: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        registry = (first if seed % 2 else second).registry
        done = 0
        while done < moves_per_thread:
            current = registry.catalog.get_version(CALLER, m, version=None, alias="production").version
            target = rng.choice([v for v in (1, 2, 3, 4) if v != current])
            try:
                change, changed = registry.promotions.set_alias(
                    Caller(actor=f"t{seed}"), m, "production", target, reason=f"{seed}", expected=current
                )
            except AbortedError:
                with lock:
                    aborts.append(seed)
                continue
            assert changed and change is not None
            with lock:
                wins.append(change.sequence)
            done += 1

    threads = run_in_threads(worker, range(8), timeout_s=120)
    assert not any(t.is_alive() for t in threads)
    history, _ = first.registry.promotions.alias_history(CALLER, m, "production", 1000, "")
    chain = list(reversed(history))
    assert len(chain) == 1 + 8 * moves_per_thread == 1 + len(wins)
    assert [c.sequence for c in chain] == list(range(1, len(chain) + 1))
    for before, after in itertools.pairwise(chain):
        assert after.from_version == before.to_version, (before, after)
    final = first.registry.catalog.get_version(CALLER, m, version=None, alias="production").version
    assert final == chain[-1].to_version
    events = [p.sequence for e, p in first.events(events_pb2.AliasChanged) if e.key == m]
    assert sorted(events) == [c.sequence for c in chain]
    first.database.dispose()
    second.database.dispose()
