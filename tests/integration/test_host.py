"""ServiceHost over a Platform: what every service process does, on the in-process and the real stack."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from gristmill.core.events import BatchHandler, Consumer, Event, Handler, Outbox
from gristmill.core.events.kafka import KafkaEventBus
from gristmill.core.events.memory import MemoryEventBus
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.host import Infrastructure, ServiceHost, Subscription, open_platform
from gristmill.core.settings import KafkaSettings, S3Settings, ServiceSettings
from gristmill.core.storage import LocalObjectStore
from gristmill.core.storage.s3 import S3ObjectStore
from tests.support.sample_server import SampleServicer

pytestmark = pytest.mark.integration


def _registration() -> ServiceRegistration:
    servicer = SampleServicer()
    return ServiceRegistration(
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        lambda server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server),
    )


async def _exercise(
    host: ServiceHost, received: list[events_pb2.AliasChanged], seen: threading.Event, key: str
) -> None:
    port = await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert (await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())).live
    # A state change and its event in one transaction; the host's relay and consumer do the rest.
    platform = host.platform
    message = events_pb2.AliasChanged(registered_model_name=key, alias="production", to_version=2)
    with platform.database.transaction() as session:
        Outbox.add(session, Event.create(message, key=key, source="test", catalog=platform.catalog))
    assert seen.wait(90), "the event written to the outbox never reached the consumer"
    assert received[0].to_version == 2
    await host.stop()
    await host.stop()  # idempotent
    with pytest.raises(grpc.aio.AioRpcError):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)


def _collector() -> tuple[list[events_pb2.AliasChanged], threading.Event, Callable[..., None]]:
    received: list[events_pb2.AliasChanged] = []
    seen = threading.Event()

    def handler(event: Event, session: Session) -> None:
        msg = events_pb2.AliasChanged()
        msg.ParseFromString(event.payload)
        received.append(msg)
        seen.set()

    return received, seen, handler


async def test_host_on_the_embedded_platform(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0)
    # Explicit empty endpoints: `make test` exports the real stack's addresses into the environment.
    platform = open_platform("sample", settings, Infrastructure())
    assert isinstance(platform.bus, MemoryEventBus)
    assert isinstance(platform.objects, LocalObjectStore)
    received, seen, handler = _collector()
    topic = platform.catalog.topic_for(events_pb2.AliasChanged)
    host = ServiceHost(platform, [_registration()], settings, [Subscription((topic,), "sample-test", handler)])
    await _exercise(host, received, seen, "m1")


async def test_host_on_kafka_and_s3(tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]) -> None:
    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    s3 = S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )
    platform = open_platform("sample", settings, Infrastructure(kafka=kafka, s3=s3))
    assert isinstance(platform.bus, KafkaEventBus)
    assert isinstance(platform.objects, S3ObjectStore)
    received, seen, handler = _collector()
    topic = platform.catalog.topic_for(events_pb2.AliasChanged)
    group = f"sample-test-{uuid.uuid4().hex[:8]}"
    key = f"m-{uuid.uuid4().hex[:8]}"

    def only_ours(event: Event, session: Session) -> None:
        # The platform topic is shared with other tests; this group reads from the start of it.
        if event.key == key:
            handler(event, session)

    host = ServiceHost(platform, [_registration()], settings, [Subscription((topic,), group, only_ours)])
    await _exercise(host, received, seen, key)


def test_a_service_started_on_an_older_database_refuses_with_one_line(tmp_path: Path) -> None:
    """The labeling service process on a database whose ``labeling_projects`` table an older release wrote without a
    column this release reads: exit status 2, one error line naming the table and column, and the database as it was."""
    import sqlite3
    import subprocess
    import sys

    from gristmill.core.sql import Database
    from gristmill.labeling.store import tables

    path = tmp_path / "labeling.db"
    database = Database(f"sqlite:///{path}")
    database.create_all(tables.metadata)
    database.dispose()
    table = tables.metadata.tables["labeling_projects"]
    # A plain column (in no key, index or constraint) that an older release would not have had.
    constrained = {c.name for group in (*table.indexes, *table.constraints) for c in group.columns}
    column = next(c.name for c in table.columns if c.name not in constrained)
    with sqlite3.connect(path) as conn:
        conn.execute(f'ALTER TABLE labeling_projects DROP COLUMN "{column}"')
        before = conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()
    done = subprocess.run(
        [sys.executable, "-m", "gristmill.labeling"],
        env={
            "PATH": "/usr/bin:/bin",
            "GRISTMILL_LABELING_DATABASE_URL": f"sqlite:///{path}",
            "GRISTMILL_LABELING_DATA_DIR": str(tmp_path / "data"),
            "GRISTMILL_LABELING_GRPC_PORT": "0",
            "GRISTMILL_AUTH_DISABLED": "true",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    # Log lines come before it (the licence, auth); the error itself is one line, the last.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("labeling: the database sqlite:///"), done.stderr[-2000:]
    assert f"labeling_projects lacks {column}" in last and "older Gristmill release" in last
    assert "Traceback" not in done.stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == before


async def test_components_open_in_order_and_close_in_reverse_after_the_server_drains(tmp_path: Path) -> None:
    """The documented order: the service's components after the platform and before the relay, consumers,
    tasks and server; closed once the server is NOT_SERVING and drained, then the last outbox flush, then the
    platform. What a component writes to the outbox while closing is still published."""
    from gristmill.core.host import PeriodicTask

    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0)
    platform = open_platform("sample", settings, Infrastructure())
    topic = platform.catalog.topic_for(events_pb2.AliasChanged)
    events: list[str] = []
    host: ServiceHost

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        async def open(self) -> None:
            events.append(f"open {self.name}")

        async def close(self) -> None:
            drained = host.server.wait_stopped()
            await asyncio.wait_for(drained, 0.1)  # the server has already drained
            events.append(f"close {self.name}")
            if self.name == "cluster":
                # Written while closing: the host's last flush still publishes it.
                message = events_pb2.AliasChanged(registered_model_name="late", alias="production", to_version=1)
                with platform.database.transaction() as session:
                    Outbox.add(session, Event.create(message, key="late", source="test", catalog=platform.catalog))

    host = ServiceHost(
        platform,
        [_registration()],
        settings,
        [Subscription((topic,), "sample-order", lambda event, session: None)],
        tasks=[PeriodicTask("sweep", lambda first: None, 60)],
        components=[Recorder("cluster"), Recorder("deployments")],
    )
    await host.start()
    assert host.opened == [
        "platform",
        "outbox-flush",
        "cluster",
        "deployments",
        "outbox-relay",
        "consumer:sample-order",
        "sweep",
        "grpc-server",
    ]
    assert events == ["open cluster", "open deployments"]
    await host.stop()
    await host.stop()  # idempotent
    assert events[2:] == ["close deployments", "close cluster"]
    assert host.opened == []
    bus = platform.bus
    assert isinstance(bus, MemoryEventBus)
    assert [r.key for r in bus.broker.records(topic)] == [b"late"]


async def test_a_component_that_fails_to_open_closes_what_was_opened(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0)
    platform = open_platform("sample", settings, Infrastructure())
    closed: list[str] = []

    class Opens:
        name = "opens"

        async def open(self) -> None:
            pass

        async def close(self) -> None:
            closed.append(self.name)

    class Fails:
        name = "fails"

        async def open(self) -> None:
            raise RuntimeError("the Ray cluster could not start")

        async def close(self) -> None:
            closed.append(self.name)

    host = ServiceHost(platform, [_registration()], settings, components=[Opens(), Fails()])
    with pytest.raises(RuntimeError, match="could not start"):
        await host.start()
    assert closed == ["opens"] and host.opened == []


class _SlowPollBus(MemoryEventBus):
    """The in-process bus with Kafka's idle poll (a consumer's stop waits for its poll to end)."""

    idle_poll_s = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.opened: list[Consumer] = []

    def subscribe(self, topics: Sequence[str], group_id: str, handler: Handler | BatchHandler) -> Consumer:
        consumer = super().subscribe(topics, group_id, handler)
        self.opened.append(consumer)
        return consumer


async def test_the_host_stops_its_consumers_together_not_one_poll_after_another(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0)
    platform = open_platform("sample", settings, Infrastructure())
    platform.bus.close()
    bus = platform.bus = _SlowPollBus(database=platform.database)
    topic = platform.catalog.topic_for(events_pb2.AliasChanged)
    subscriptions = [Subscription((topic,), f"group-{n}", lambda event, session: None) for n in range(8)]
    host = ServiceHost(platform, [_registration()], settings, subscriptions)
    await host.start()
    assert len(bus.opened) == 8 and all(c.running for c in bus.opened)
    await asyncio.sleep(0.3)  # every consumer is inside a poll
    began = asyncio.get_running_loop().time()
    await host.stop()
    took = asyncio.get_running_loop().time() - began
    # One after another, each stop would wait for the rest of its own poll (6.7 s for eight when tried); asked
    # together, their polls end within one.
    assert took < 1.8, f"stopping eight consumers took {took:.1f}s"
    assert not any(c.running for c in bus.opened)
