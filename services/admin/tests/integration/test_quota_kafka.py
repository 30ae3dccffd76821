"""Quotas end to end on real gRPC and a real Kafka broker.

A metered service (auth through the admin service, a QuotaGuard reading plans and usage from it, usage
published through its outbox to Kafka) takes calls until the plan's daily quota is used up: the (N+1)th
is RESOURCE_EXHAUSTED with a retry-after, failed calls are not counted, and the admin service's aggregator,
fed from Kafka, reports exactly N.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.core.auth import SERVING_PREDICT, AuthSettings, current_principal
from gristmill.core.auth_quota import QuotaGuard, UsageKind, UsageRecorder
from gristmill.core.auth_remote import RemotePlanSource, RemoteUsageSource
from gristmill.core.errors import NotFoundError
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.host import Infrastructure, ServiceHost, open_platform
from gristmill.core.security import build_auth_hook
from gristmill.core.settings import KafkaSettings, ServiceSettings
from services.admin.tests.support import bearer, running_admin

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
        plan = pb.Plan(
            name="tiny", quotas=[pb.Quota(kind=pb.USAGE_KIND_PREDICTIONS, period=pb.QUOTA_PERIOD_DAY, limit=QUOTA)]
        )
        await admin.create_org(org, plan)
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
