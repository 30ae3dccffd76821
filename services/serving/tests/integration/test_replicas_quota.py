"""Two serving replicas of one deployment on the real stack: one PostgreSQL serving database shared by both,
the real admin service verifying keys and aggregating usage from the real Kafka broker, real gRPC ports.

(a) A deployment created through replica A is served by replica B once B's periodic sync has read the store;
deleted through B, A stops serving it.

(b) Quotas hold across replicas within the documented bound (services/admin/README.md, "Quotas across
replicas"): with a plan of N predictions a day and calls spread over both replicas at a known rate r each,
between N and N + (R - 1) x r x L + r x A calls are admitted (A: a commit's time to the admin's aggregator,
at least 1 s here, or what the run measured on a slower machine; L = A + the quota refresh interval), no call
is refused before N were admitted, and once the aggregator has caught up both replicas refuse and the admin's
total equals the admitted calls exactly (each replica's outbox relay may publish the other's rows too: the
aggregator counts an event once).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gristmill.api.admin.v1 import admin_pb2
from gristmill.api.common.v1 import common_pb2
from gristmill.api.serving.v1 import serving_pb2 as pb
from gristmill.api.serving.v1 import serving_pb2_grpc as pb_grpc
from gristmill.core.auth import ADMIN, SERVING_PREDICT, AuthSettings
from gristmill.core.events.topics import USAGE_RECORDED
from gristmill.core.host import Infrastructure
from gristmill.core.license_service import LICENSE_METHOD_SCOPES
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.settings import KafkaSettings
from gristmill.serving.app import METHOD_SCOPES, PUBLIC_METHODS, ServingApp, build_app
from gristmill.serving.runtime.sources import LocalDirectoryModelSource
from gristmill.serving.settings import ServingSettings
from services.admin.tests.support import RunningAdmin, bearer, daily_predictions_plan, running_admin
from services.serving.tests.support import ENTERPRISE
from tests.support.databases import fresh_postgres_database
from tests.support.kafka_groups import wait_until_caught_up
from tests.support.tiny_model import make_tiny_bert

pytestmark = pytest.mark.integration

QUOTA = 40  # N: predictions per day
REPLICAS = 2  # R
RATE = 10.0  # r: calls per second sent to each replica
REFRESH_S = 0.2  # the quota refresh interval
AGGREGATION_S = 1.0  # A: allowance for the group commit, the outbox relay, Kafka and the aggregator
# The replicas' outbox linger (the default is 1 s): a shorter A keeps the bound under R x N - N, so that the run can
# tell a quota shared by the replicas from one each replica applies alone (the formula holds for any linger).
LINGER_S = 0.2
DURATION_S = 5.0  # of sending: the quota is used up after about QUOTA / (REPLICAS x RATE) = 2 s
SYNC_S = 0.3  # the replicas' deployment sync interval


def overshoot_bound(replicas: int, rate: float, refresh_s: float, aggregation_s: float) -> float:
    """The documented bound on calls admitted beyond a quota (services/admin/README.md)."""
    return (replicas - 1) * rate * (aggregation_s + refresh_s) + rate * aggregation_s


@dataclass
class Replica:
    name: str
    app: ServingApp
    security: Security
    stub: pb_grpc.ServingServiceStub


@dataclass(frozen=True)
class Call:
    replica: str
    sent: float
    answered: float
    code: grpc.StatusCode


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, admin: RunningAdmin, kafka: KafkaSettings, run: str) -> AsyncIterator[list[Replica]]:
    """Two serving apps on one fresh PostgreSQL database, keys verified and quotas read at ``admin``, models from a
    local directory (version 1 of ``sentiment``: a tiny BERT)."""
    models = tmp_path / "models"
    make_tiny_bert(models / "sentiment" / "1", ["great food", "awful service"], ["negative", "positive"])
    started: list[Replica] = []
    with contextlib.contextmanager(fresh_postgres_database)() as database_url:
        try:
            for replica_id in ("", "r1"):
                security = Security(
                    build_auth_hook(
                        AuthSettings(admin_address=admin.address, root_organization_id="root"),
                        method_scopes={**METHOD_SCOPES, **LICENSE_METHOD_SCOPES},
                        embedded=False,
                        public=PUBLIC_METHODS,
                    ),
                    ENTERPRISE,
                    service_key=admin.root_secret,
                    admin_address=admin.address,
                    cache_ttl_s=0,
                    quota_refresh_s=REFRESH_S,
                )
                settings = ServingSettings(
                    data_dir=tmp_path / f"serving-{replica_id or 'r0'}",
                    database_url=database_url,
                    grpc_port=0,
                    shutdown_grace_s=2.0,
                    batch_workers=1,
                    consumer_group=f"serving-replicas-{run}",
                    replica=replica_id,
                    deployment_sync_s=SYNC_S,
                    outbox_linger_s=LINGER_S,
                )
                app = build_app(
                    settings, Infrastructure(kafka=kafka), security, source=LocalDirectoryModelSource(models)
                )
                port = await app.host.start()
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                started.append(Replica(replica_id or "r0", app, security, pb_grpc.ServingServiceStub(channel)))
            yield started
        finally:
            for replica in reversed(started):
                await replica.app.host.stop()
                replica.security.close()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s:.0f} s")


async def test_replicas_share_deployments_and_hold_the_quota_within_the_bound(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    run = uuid.uuid4().hex[:8]
    org = f"replicas-{run}"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    async with running_admin(tmp_path, kafka=kafka, metering_group=f"metering-replicas-{run}") as admin:
        await admin.create_org(org, daily_predictions_plan(QUOTA, "small"))
        operator = bearer(await admin.create_key(org, ADMIN))
        caller = bearer(await admin.create_key(org, SERVING_PREDICT))
        root = bearer(admin.root_secret)

        async def admin_total() -> float:
            usage = await admin.metering.GetUsage(
                admin_pb2.GetUsageRequest(organization_id=org, kinds=[admin_pb2.USAGE_KIND_PREDICTIONS]), metadata=root
            )
            return float(sum(t.quantity for t in usage.totals))

        async with replicas(tmp_path, admin, kafka, run) as (a, b):
            # (a) Created through A, served by B after its sync.
            deployment = pb.Deployment(
                name="sentiment",
                registered_model_name="sentiment",
                target=common_pb2.ModelVersionSelector(version=1),
            )
            await a.stub.CreateDeployment(
                pb.CreateDeploymentRequest(deployment=deployment, wait_until_ready=True), metadata=operator
            )

            async def ready_on(replica: Replica) -> bool:
                got = await replica.stub.GetDeployment(pb.GetDeploymentRequest(name="sentiment"), metadata=caller)
                return bool(got.status.state == pb.DEPLOYMENT_STATE_READY)

            assert await ready_on(a)
            await wait_until(lambda: ready_on(b), 60, "replica B did not serve the deployment created through A")

            # A new metering group starts at the beginning of the usage topic: on a broker that earlier tests filled
            # it first counts their events, and A would time that backlog rather than this test's calls.
            await asyncio.to_thread(wait_until_caught_up, kafka_bootstrap, f"metering-replicas-{run}", USAGE_RECORDED)

            # (b) Calls spread over both replicas, r per second each, sent on a fixed schedule.
            calls: list[Call] = []

            async def one_call(replica: Replica) -> None:
                sent = time.monotonic()
                code = grpc.StatusCode.OK
                try:
                    await replica.stub.Predict(
                        pb.PredictRequest(model="sentiment", texts=["great food"]), metadata=caller, timeout=30
                    )
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                calls.append(Call(replica.name, sent, time.monotonic(), code))

            async def drive(replica: Replica, start: float) -> None:
                pending = []
                for i in range(int(DURATION_S * RATE)):
                    await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
                    pending.append(asyncio.create_task(one_call(replica)))
                await asyncio.gather(*pending)

            # The admin's total over time, to measure A on this run: the bound is the documented formula with the
            # aggregation latency the machine actually had (a busy CI machine can take longer than 1 s).
            samples: list[tuple[float, float]] = []
            sampling = True

            async def sample_totals() -> None:
                while sampling:
                    samples.append((time.monotonic(), await admin_total()))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample_totals())
            start = time.monotonic() + 0.1
            await asyncio.gather(drive(a, start), drive(b, start))

            admitted = [c for c in calls if c.code == grpc.StatusCode.OK]
            refused = [c for c in calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(admitted) + len(refused) == len(calls), {c.code for c in calls}

            # Until the aggregator has counted every admitted call, then A: the longest a call's count took to
            # reach the admin's total after the call was answered (the k-th answer against the total reaching k).
            async def counted_all() -> bool:
                return bool(samples) and samples[-1][1] >= len(admitted)

            await wait_until(counted_all, 60, "the admin's aggregator did not count the admitted calls")
            sampling = False
            await sampler
            answers = sorted(c.answered for c in admitted)
            measured_a = max(
                next(t for t, total in samples if total >= k) - answered for k, answered in enumerate(answers, 1)
            )
            aggregation_s = max(AGGREGATION_S, measured_a)
            bound = overshoot_bound(REPLICAS, RATE, REFRESH_S, aggregation_s)
            # A schedule of r calls per second puts at most r x t + 1 calls in any t seconds: one more per replica.
            allowed = QUOTA + math.floor(bound) + REPLICAS
            overshoot = len(admitted) - QUOTA
            per_replica = {r.name: sum(c.replica == r.name for c in admitted) for r in (a, b)}
            print(
                f"\nquota {QUOTA}, {REPLICAS} replicas at {RATE:g} calls/s each, refresh {REFRESH_S:g} s: "
                f"admitted {len(admitted)} of {len(calls)} ({per_replica}), measured overshoot {overshoot}; "
                f"documented bound {bound:g} (with A = {aggregation_s:.2f} s; measured {measured_a:.2f} s), "
                f"(R-1) x r x L alone {(REPLICAS - 1) * RATE * (aggregation_s + REFRESH_S):g}"
            )
            # Otherwise the bound would admit what two replicas each applying the quota alone admit (A too long).
            assert allowed < REPLICAS * QUOTA, f"A = {aggregation_s:.2f} s: too slow to tell a shared quota"
            assert QUOTA <= len(admitted) <= allowed
            assert all(per_replica.values()), "both replicas admitted calls"
            assert {c.replica for c in refused} == {a.name, b.name}, "both replicas refused calls"
            # Never refused before N were admitted: a refusal means its replica knew of N admitted calls, all sent
            # before the refusal came back.
            for refusal in refused:
                assert sum(c.sent < refusal.answered for c in admitted) >= QUOTA, refusal

            # The aggregator has caught up (above): both refuse, and the admin's total is exactly what was admitted.
            await asyncio.sleep(REFRESH_S + 1.0)  # a refresh on each replica; a duplicate event would arrive by now
            for replica in (a, b):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await replica.stub.Predict(
                        pb.PredictRequest(model="sentiment", texts=["great food"]), metadata=caller, timeout=30
                    )
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"0 of {QUOTA} left" in (err.value.details() or "")
            assert await admin_total() == len(admitted)

            # (a) Deleted through B: A stops serving it (NOT_FOUND before any quota check).
            await b.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="sentiment"), metadata=operator)

            async def gone_from_a() -> bool:
                try:
                    await a.stub.Predict(pb.PredictRequest(model="sentiment", texts=["great food"]), metadata=caller)
                except grpc.aio.AioRpcError as exc:
                    return exc.code() == grpc.StatusCode.NOT_FOUND
                return False

            await wait_until(gone_from_a, 30, "replica A still served the deployment deleted through B")
            assert not a.app.service.manager.has(org, "sentiment")
