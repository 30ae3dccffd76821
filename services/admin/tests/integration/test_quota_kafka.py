"""Quotas end to end on real gRPC and a real Kafka broker.

A metered service (auth through the admin service, a QuotaGuard reading plans and usage from it, usage
published through its outbox to Kafka) takes calls until the plan's daily quota is used up: the (N+1)th
is RESOURCE_EXHAUSTED with a retry-after, failed calls are not counted, and the admin service's aggregator,
fed from Kafka, reports exactly N. And the aggregator alone, on the real broker and PostgreSQL, sums batches
of usage events exactly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.admin.domain.admin import Admin, LocalKeyVerifier
from gristmill.admin.domain.metering import Metering
from gristmill.admin.domain.model import Granularity, UsageQuery
from gristmill.admin.events.handlers import usage_recorded_handler
from gristmill.admin.store.sql import SqlAdminStore
from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.events.v1 import events_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.core.auth import SERVING_PREDICT, AuthSettings, current_principal
from gristmill.core.auth_quota import Plan, QuotaGuard, UsageKind, UsageRecorder
from gristmill.core.auth_remote import RemotePlanSource, RemoteUsageSource
from gristmill.core.errors import NotFoundError
from gristmill.core.events import Event, EventCatalog, KafkaEventBus
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.host import Infrastructure, ServiceHost, open_platform
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.security import build_auth_hook
from gristmill.core.settings import KafkaSettings, ServiceSettings
from services.admin.tests.support import ROOT, ROOT_ADMIN, Env, FakeClock, bearer, daily_predictions_plan, running_admin
from tests.support.databases import fresh_postgres_database, migrated_database

pytestmark = pytest.mark.integration

QUOTA = 5


class MeteredServicer(oip_grpc.GRPCInferenceServiceServicer):
    """ServerLive is a "prediction" worth one unit; ModelReady reserves one and then fails."""

    def __init__(self, guard: QuotaGuard) -> None:
        self.guard = guard

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        reservation = await asyncio.to_thread(
            self.guard.reserve, current_principal(), {UsageKind.PREDICTIONS: 1}, resource="deployment/quota-test"
        )
        await asyncio.to_thread(reservation.commit)
        return oip.ServerLiveResponse(live=True)

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        reservation = await asyncio.to_thread(
            self.guard.reserve, current_principal(), {UsageKind.PREDICTIONS: 1}, resource="deployment/quota-test"
        )
        with reservation:
            raise NotFoundError(f"model {request.name!r} is not deployed")


async def test_the_call_beyond_the_quota_is_refused_and_usage_matches_successes(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    run = uuid.uuid4().hex[:8]
    org = f"quota-{run}"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    async with running_admin(tmp_path, kafka=kafka, metering_group=f"metering-test-{run}") as admin:
        await admin.create_org(org, daily_predictions_plan(QUOTA))
        caller = bearer(await admin.create_key(org, SERVING_PREDICT))

        settings = ServiceSettings(data_dir=tmp_path / "metered", grpc_port=0)
        platform = open_platform("metered", settings, Infrastructure(kafka=kafka))
        guard = QuotaGuard(
            RemotePlanSource(admin.address, admin.root_secret),
            RemoteUsageSource(admin.address, admin.root_secret),
            UsageRecorder(platform.database, platform.catalog, "metered"),
        )
        servicer = MeteredServicer(guard)
        registration = ServiceRegistration(
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            lambda server: oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server),
        )
        hook = build_auth_hook(
            AuthSettings(admin_address=admin.address),
            method_scopes={"/inference.GRPCInferenceService/*": SERVING_PREDICT},
            embedded=False,
        )
        host = ServiceHost(platform, [registration], settings, auth_hook=hook)
        port = await host.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = oip_grpc.GRPCInferenceServiceStub(channel)
                for i in range(QUOTA):
                    assert (await stub.ServerLive(oip.ServerLiveRequest(), metadata=caller)).live
                    if i < 2:  # failed calls in between reserve and release: never counted
                        with pytest.raises(grpc.aio.AioRpcError) as failed:
                            await stub.ModelReady(oip.ModelReadyRequest(name="ghost"), metadata=caller)
                        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ServerLive(oip.ServerLiveRequest(), metadata=caller)
            refused = err.value
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"0 of {QUOTA} left" in (refused.details() or "")
            trailing = dict(refused.trailing_metadata() or ())
            now = datetime.now(UTC)
            to_midnight = (now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now).seconds
            assert abs(int(trailing["retry-after"]) - to_midnight) <= 5
            assert trailing["gristmill-retry-after"] == trailing["retry-after"]

            # The aggregator, fed from Kafka, counts exactly the successful calls.
            root = bearer(admin.root_secret)
            deadline = time.monotonic() + 120
            total = -1.0
            while time.monotonic() < deadline:
                usage = await admin.metering.GetUsage(
                    pb.GetUsageRequest(organization_id=org, kinds=[pb.USAGE_KIND_PREDICTIONS]), metadata=root
                )
                total = sum(t.quantity for t in usage.totals)
                if total >= QUOTA:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # anything extra (a duplicate, a failed call) would arrive by now
            usage = await admin.metering.GetUsage(
                pb.GetUsageRequest(organization_id=org, kinds=[pb.USAGE_KIND_PREDICTIONS], group_by_api_key=True),
                metadata=root,
            )
            assert [(t.api_key_id, t.quantity) for t in usage.totals] == [(caller[0][1].split("_")[1], QUOTA)]
            status = await admin.metering.GetQuotaStatus(pb.GetQuotaStatusRequest(organization_id=org), metadata=root)
            assert [(q.used, q.remaining) for q in status.quotas] == [(QUOTA, 0.0)]
        finally:
            await host.stop()


@pytest.fixture
def admin_on_postgres(tmp_path: Path) -> Iterator[Env]:
    """The admin domain on a fresh database of the real PostgreSQL server, migrated as the service does."""
    for url in fresh_postgres_database():
        database = migrated_database(url, "admin")
        store = SqlAdminStore(database)
        clock = FakeClock(datetime.now(UTC))
        admin = Admin(store, root_organization_id=ROOT, clock=clock)
        admin.bootstrap(tmp_path / "root.key")
        try:
            yield Env(
                admin, Metering(store, admin, clock=clock), store, LocalKeyVerifier(store, clock=clock), database, clock
            )
        finally:
            database.dispose()


def test_the_aggregator_sums_a_batch_from_kafka_exactly(
    kafka_bootstrap: str, admin_on_postgres: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Usage events published as one batch to the real broker and consumed into PostgreSQL in batches: the
    totals are exact, each batch costs one upsert per (organisation, key, kind, hour), and an invalid event in
    a later batch goes to the dead-letter topic alone while the rest of that batch is still counted once."""
    env = admin_on_postgres
    run = uuid.uuid4().hex[:8]
    org = f"batch-{run}"
    env.admin.create_organization(ROOT_ADMIN, org, "", Plan())
    catalog = EventCatalog()
    topic = f"gristmill.test.usage{run}.v1"
    catalog.register(events_pb2.UsageRecorded, topic)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)

    def usage(key: str, kind: UsageKind, quantity: float, at: datetime) -> Event:
        message = events_pb2.UsageRecorded(
            organization_id=org, api_key_id=key, kind=kind.value, quantity=quantity, resource="deployment/d"
        )
        return Event.create(message, key=org, source="serving", catalog=catalog, event_time=at)

    # 240 events in 8 totals (two keys, two kinds, two hours); quantities whose sums are exact in binary.
    kinds = (UsageKind.PREDICTIONS, UsageKind.INPUT_TOKENS)
    events = [
        usage(f"k{i % 2}", kinds[i // 2 % 2], 0.5 * (i % 4 + 1), hour + timedelta(hours=i // 120, minutes=i % 60))
        for i in range(240)
    ]
    invalid = usage("k0", UsageKind.PREDICTIONS, -3, hour)
    batches: list[int] = []
    upserts: list[float] = []
    record_many, add_usage = env.metering.record_many, env.store.add_usage

    def counted_batch(session: Any, usages: Any) -> None:
        usages = list(usages)
        batches.append(len(usages))
        record_many(session, usages)

    def counted_upsert(session: Any, *args: Any) -> None:
        upserts.append(args[-1])
        add_usage(session, *args)

    monkeypatch.setattr(env.metering, "record_many", counted_batch)
    monkeypatch.setattr(env.store, "add_usage", counted_upsert)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, request_timeout_ms=5000)
    metrics = ServiceMetrics("admin-test")
    extra = [usage("k0", UsageKind.PREDICTIONS, 1, hour + timedelta(minutes=i)) for i in range(10)]
    with (
        KafkaEventBus(kafka) as producer,
        KafkaEventBus(kafka, database=env.database, metrics=metrics, max_poll_records=500) as bus,
    ):
        consumer = bus.subscribe([topic], f"metering-{run}", usage_recorded_handler(env.metering, catalog))

        def publish_and_consume(batch: list[Event]) -> None:
            assert producer.publish_many(batch).error is None
            settled = 0
            deadline = time.monotonic() + 60
            while settled < len(batch):
                assert time.monotonic() < deadline, f"only {settled} of {len(batch)} usage events settled"
                settled += consumer.poll_once(0.5)

        publish_and_consume(events)
        assert max(batches) > 1, "the aggregator got batches"
        assert len(upserts) <= 8 * len(batches), "one upsert per total of a batch"
        assert sum(upserts) == sum(0.5 * (i % 4 + 1) for i in range(240))
        # A batch holding an invalid event is written event by event, so only that one is dead-lettered.
        publish_and_consume([*extra[:5], invalid, *extra[5:]])
    handled = metrics.events_handled.labels("admin-test", topic, "handled")._value.get()
    assert handled == len(events) + len(extra)
    assert metrics.events_handled.labels("admin-test", topic, "dead_lettered")._value.get() == 1
    env.clock.now = datetime.now(UTC)
    by_key = env.metering.usage(
        ROOT_ADMIN,
        UsageQuery(org, start=hour, granularity=Granularity.HOUR, group_by_api_key=True),
    )
    expected: dict[tuple[datetime, UsageKind, str], float] = {(hour, UsageKind.PREDICTIONS, "k0"): len(extra)}
    for i in range(240):
        slot = (hour + timedelta(hours=i // 120), kinds[i // 2 % 2], f"k{i % 2}")
        expected[slot] = expected.get(slot, 0.0) + 0.5 * (i % 4 + 1)
    assert {(t.period_start, t.kind, t.api_key_id): t.quantity for t in by_key if t.quantity} == expected
