"""Several serving replicas sharing one deployment store: ``DeploymentService.sync`` brings each in line with the
writes taken by the others, each replica reads alias changes in a consumer group of its own (so each hot-swaps),
and a bad replica id is refused at start."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from gristmill.core.errors import ConfigurationError, NotFoundError
from gristmill.core.events import MemoryBroker, MemoryEventBus
from gristmill.core.events.topics import ALIAS_CHANGED
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.core.settings import load_settings
from gristmill.serving.app import ServingApp, build_app
from gristmill.serving.domain.model import DEFAULT_ORGANIZATION, BatchingConfig, DeploymentSpec, VersionSelector
from gristmill.serving.domain.service import SyncResult
from gristmill.serving.domain.versions import DeploymentState
from gristmill.serving.settings import ServingSettings
from services.serving.tests.support import ENTERPRISE, Env, FakeLoader, FakeSource, make_service, wait_for
from services.serving.tests.unit.test_events import alias_event

ORG = DEFAULT_ORGANIZATION


def spec(name: str = "sentiment", **kwargs: object) -> DeploymentSpec:
    return DeploymentSpec(organization_id=ORG, name=name, registered_model_name="sentiment", **kwargs)  # type: ignore[arg-type]


def replica(tmp_path: Path) -> Env:
    """A deployment service on the SQLite store in ``tmp_path`` (each call: another replica on the same store)."""
    env = make_service(tmp_path)
    env.source.add("sentiment", 1)
    env.source.add("sentiment", 2)
    env.source.aliases[("sentiment", "production")] = 1
    return env


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Env, Env]]:
    a, b = replica(tmp_path), replica(tmp_path)
    await a.service.start()
    await b.service.start()
    yield a, b
    for env in (a, b):
        await env.service.close()
        env.database.dispose()


async def test_a_deployment_written_through_one_replica_is_served_by_the_other_after_a_sync(
    pair: tuple[Env, Env],
) -> None:
    a, b = pair
    await a.service.create(spec(), wait_until_ready=True, timeout_s=5)
    with pytest.raises(NotFoundError):
        await b.service.predict(ORG, "sentiment", ["good"])
    # What a replica wrote itself reads back from the store unchanged: its own sync changes nothing.
    assert await a.service.sync() == SyncResult()
    assert await b.service.sync() == SyncResult(added=("sentiment",))
    await b.manager.wait_settled(ORG, "sentiment", 5)
    assert (await b.service.predict(ORG, "sentiment", ["good"]))[0].version == 1
    assert await b.service.sync() == SyncResult()

    # A change through B (batching at once, a new target loads beside the serving version) reaches A.
    current = await b.service.current(ORG, "sentiment")
    changed = replace(
        current,
        target=VersionSelector.of_version(2),
        batching=BatchingConfig(max_batch_size=4, max_delay_ms=0, max_queue_size=8),
    )
    await b.service.update(changed, previous=current, wait_until_ready=True, timeout_s=5)
    assert await a.service.sync() == SyncResult(updated=("sentiment",))
    await a.manager.wait_settled(ORG, "sentiment", 5)
    assert (await a.service.predict(ORG, "sentiment", ["good"]))[0].version == 2
    version = a.manager.loaded_versions(ORG, "sentiment")[0]
    assert version.batcher is not None and version.batcher.policy.max_batch_size == 4
    assert a.manager.spec(ORG, "sentiment") == a.store.get(ORG, "sentiment")
    await wait_for(lambda: a.loader.of_version(1).closed)
    assert await a.service.sync() == SyncResult()

    # Deleted through B: A stops routing and frees the model.
    await b.service.delete(ORG, "sentiment")
    assert await a.service.sync() == SyncResult(removed=("sentiment",))
    with pytest.raises(NotFoundError):
        await a.service.predict(ORG, "sentiment", ["good"])
    await wait_for(lambda: a.loader.of_version(2).closed)


async def test_a_write_through_the_replica_that_has_not_synced_yet_works_on_the_store(pair: tuple[Env, Env]) -> None:
    a, b = pair
    await a.service.create(spec(), wait_until_ready=True, timeout_s=5)
    # B has not synced: it updates what is stored (and starts serving it), and deletes it from the store.
    current = await b.service.current(ORG, "sentiment")
    view = await b.service.update(
        replace(current, target=VersionSelector.of_version(2)), previous=current, wait_until_ready=True, timeout_s=5
    )
    assert view.state is DeploymentState.READY
    assert (await b.service.predict(ORG, "sentiment", ["good"]))[0].version == 2
    await b.service.delete(ORG, "sentiment")
    assert await b.service.sync() == SyncResult()
    assert await a.service.sync() == SyncResult(removed=("sentiment",))


async def test_the_host_syncs_the_store_periodically(tmp_path: Path) -> None:
    apps = [build_replica_app(tmp_path, replica_id, broker=MemoryBroker()) for replica_id in ("", "r1")]
    for app, _ in apps:
        await app.host.start()
    try:
        (a, _), (b, _) = apps
        await a.service.create(spec(), wait_until_ready=True, timeout_s=5)
        await wait_for(lambda: b.service.manager.has(ORG, "sentiment"), timeout_s=5)
        await b.service.manager.wait_settled(ORG, "sentiment", 5)
        assert (await b.service.predict(ORG, "sentiment", ["good"]))[0].version == 1
        await b.service.delete(ORG, "sentiment")
        await wait_for(lambda: not a.service.manager.has(ORG, "sentiment"), timeout_s=5)
    finally:
        for app, _ in reversed(apps):
            await app.host.stop()


def build_replica_app(tmp_path: Path, replica_id: str, *, broker: MemoryBroker) -> tuple[ServingApp, FakeSource]:
    """A serving app on the store shared by every replica in ``tmp_path`` (its data dir its own), on ``broker``."""
    source = FakeSource()
    source.add("sentiment", 1)
    source.add("sentiment", 2)
    source.aliases[("sentiment", "production")] = 1
    settings = ServingSettings(
        data_dir=tmp_path / f"serving-{replica_id or 'r0'}",
        database_url=f"sqlite:///{tmp_path / 'serving.db'}",
        grpc_port=0,
        shutdown_grace_s=1.0,
        batch_workers=1,
        replica=replica_id,
        deployment_sync_s=0.1,
    )
    app = build_app(
        settings,
        Infrastructure(memory_broker=broker),
        embedded_security("serving", ENTERPRISE),
        source=source,
        loader=FakeLoader(),
        rng=random.Random(3),
    )
    return app, source


def consumed(broker: MemoryBroker, group: str) -> int:
    """Alias-changed records ``group`` has handled (committed), over all partitions."""
    return sum(broker.committed(group, ALIAS_CHANGED, p) for p in range(broker.partitions))


def served_version(app: ServingApp) -> int:
    manager = app.service.manager
    versions = manager.loaded_versions(ORG, "sentiment") if manager.has(ORG, "sentiment") else []
    return versions[0].version if versions else 0


async def test_every_replica_follows_an_alias_change(tmp_path: Path) -> None:
    broker = MemoryBroker()
    apps = [build_replica_app(tmp_path, replica_id, broker=broker) for replica_id in ("", "r1")]
    for app, _ in apps:
        await app.host.start()
    try:
        (a, _), (b, _) = apps
        await a.service.create(spec(), wait_until_ready=True, timeout_s=5)
        await wait_for(lambda: served_version(b) == 1, timeout_s=5)
        groups = {next(iter(app.host.component_health())) for app, _ in apps}
        assert groups == {"gristmill.consumer.serving", "gristmill.consumer.serving.r1"}
        for _, source in apps:
            source.aliases[("sentiment", "production")] = 2
        # One event; both replicas (each in its own group, both recording the sequence in the one store) swap.
        bus = a.host.platform.bus
        assert isinstance(bus, MemoryEventBus)
        bus.publish(alias_event(a.host, to_version=2, sequence=5))
        await wait_for(lambda: served_version(a) == 2 and served_version(b) == 2, timeout_s=10)
        # An older event arriving late moves neither back.
        bus.publish(alias_event(a.host, to_version=1, sequence=4))
        await wait_for(lambda: consumed(broker, "serving") >= 2 and consumed(broker, "serving.r1") >= 2, timeout_s=10)
        for app, _ in apps:
            await app.service.manager.wait_settled(ORG, "sentiment", 5)
        assert served_version(a) == 2 and served_version(b) == 2
    finally:
        for app, _ in reversed(apps):
            await app.host.stop()


def test_each_replica_reads_alias_changes_in_a_group_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServingSettings().resolved_consumer_group() == "serving"
    assert ServingSettings(replica="r1").resolved_consumer_group() == "serving.r1"
    assert ServingSettings(consumer_group="serving-ci", replica="eu-2").resolved_consumer_group() == "serving-ci.eu-2"
    for bad in ("R1", "r_1", "-r1", "r1.x", "x" * 33):
        with pytest.raises(ValidationError, match="lowercase letters, digits or '-'"):
            ServingSettings(replica=bad)
    monkeypatch.setenv("GRISTMILL_SERVING_REPLICA", "Replica 1")
    with pytest.raises(ConfigurationError, match="GRISTMILL_SERVING_REPLICA='Replica 1'"):
        load_settings(ServingSettings)
