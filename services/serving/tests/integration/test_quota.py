"""Serving metered end to end on real gRPC and a real Kafka broker.

Keys are verified by the admin service, the plan comes from it, and serving publishes usage through its outbox
to Kafka, where the admin service's aggregator counts it: the prediction beyond the plan's daily quota is
RESOURCE_EXHAUSTED with a retry-after, a failed call is not counted, and the totals (predictions and the input
tokens the model read) match the successful calls exactly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from gristmill.api.admin.v1 import admin_pb2
from gristmill.api.common.v1 import common_pb2
from gristmill.api.serving.v1 import serving_pb2 as pb
from gristmill.api.serving.v1 import serving_pb2_grpc as pb_grpc
from gristmill.core.auth import ADMIN, SERVING_PREDICT, AuthSettings
from gristmill.core.license_service import LICENSE_METHOD_SCOPES
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.settings import KafkaSettings
from gristmill.serving.app import METHOD_SCOPES, PUBLIC_METHODS
from services.admin.tests.support import bearer, daily_predictions_plan, running_admin
from services.serving.tests.support import ENTERPRISE, build_fake_host

pytestmark = pytest.mark.integration

QUOTA = 4


async def test_the_prediction_beyond_the_quota_is_refused_and_usage_matches_successes(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    run = uuid.uuid4().hex[:8]
    org = f"serving-quota-{run}"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    async with running_admin(tmp_path, kafka=kafka, metering_group=f"metering-serving-{run}") as admin:
        await admin.create_org(org, daily_predictions_plan(QUOTA, "tiny"))
        operator = bearer(await admin.create_key(org, ADMIN))
        caller = bearer(await admin.create_key(org, SERVING_PREDICT))
        # As a serving process builds it from GRISTMILL_AUTH_*: keys checked at the admin service, plans and
        # usage read with the service's own (root admin) key.
        security = Security(
            build_auth_hook(
                AuthSettings(admin_address=admin.address, cache_ttl_s=0, root_organization_id="root"),
                method_scopes={**METHOD_SCOPES, **LICENSE_METHOD_SCOPES},
                embedded=False,
                public=PUBLIC_METHODS,
            ),
            ENTERPRISE,
            service_key=admin.root_secret,
            admin_address=admin.address,
            cache_ttl_s=0,
        )
        host, _, _ = build_fake_host(tmp_path / "serving", security=security, kafka=kafka)
        port = await host.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ServingServiceStub(channel)
                deployment = pb.Deployment(name="sentiment", registered_model_name="sentiment")
                await stub.CreateDeployment(
                    pb.CreateDeploymentRequest(deployment=deployment, wait_until_ready=True), metadata=operator
                )
                for i in range(QUOTA):
                    reply = await stub.Predict(pb.PredictRequest(model="sentiment", texts=["great"]), metadata=caller)
                    assert reply.predictions[0].label == "positive"
                    if i < 2:  # a call that fails after its reservation: never counted
                        with pytest.raises(grpc.aio.AioRpcError) as failed:
                            await stub.Predict(
                                pb.PredictRequest(
                                    model="sentiment", texts=["bad"], target=common_pb2.ModelVersionSelector(version=2)
                                ),
                                metadata=caller,
                            )
                        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Predict(pb.PredictRequest(model="sentiment", texts=["great"]), metadata=caller)
            refused = err.value
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"0 of {QUOTA} left" in (refused.details() or "")
            trailing = dict(refused.trailing_metadata() or ())
            now = datetime.now(UTC)
            to_midnight = (now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now).seconds
            assert abs(int(trailing["retry-after"]) - to_midnight) <= 5

            # The aggregator, fed from Kafka, counts exactly the successful calls: QUOTA predictions of one
            # word each, which the fake tokenizer reads as 3 tokens (the word and two special tokens).
            root = bearer(admin.root_secret)
            kinds = [admin_pb2.USAGE_KIND_PREDICTIONS, admin_pb2.USAGE_KIND_INPUT_TOKENS]
            expected = {admin_pb2.USAGE_KIND_PREDICTIONS: QUOTA, admin_pb2.USAGE_KIND_INPUT_TOKENS: 3 * QUOTA}
            totals: dict[int, float] = {}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and totals != expected:
                usage = await admin.metering.GetUsage(
                    admin_pb2.GetUsageRequest(organization_id=org, kinds=kinds), metadata=root
                )
                totals = {t.kind: t.quantity for t in usage.totals}
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # anything extra (a duplicate, a failed call) would arrive by now
            usage = await admin.metering.GetUsage(
                admin_pb2.GetUsageRequest(organization_id=org, kinds=kinds, group_by_api_key=True), metadata=root
            )
            key_id = caller[0][1].split("_")[1]
            assert sorted((t.api_key_id, t.kind, t.quantity) for t in usage.totals) == sorted(
                (key_id, kind, quantity) for kind, quantity in expected.items()
            )
        finally:
            await host.stop()
