"""The online gate on the real stack: training's job events on Kafka become versions in S3, the floors-only gate
puts the first on ``production`` at once and the second on ``candidate``; serving's ``FeedbackRecorded`` events,
published the way serving's outbox publishes them (one redelivered, one generation rated twice), make the gate
roll the worse canary back, with its numbers in the alias history and an ``alias changed`` event on Kafka."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.events import Event, KafkaEventBus
from gristmill.core.host import Infrastructure, ServiceHost, Subscription
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from gristmill.registry.store.tables import OnlineOutcomeRow
from services.registry.tests.integration.test_registry_kafka_s3 import (
    eventually,
    job_succeeded,
    only_keys,
    upload_job_output,
)
from tests.support.tiny_model import make_tiny_bert

pytestmark = pytest.mark.integration

MIN_FEEDBACK = 6


def feedback(model: str, version: int, request_id: str, kind: int, rating: int = 0) -> Any:
    return events_pb2.FeedbackRecorded(
        request_id=request_id,
        kind=kind,  # type: ignore[arg-type]
        rating=rating,
        generation=events_pb2.GenerationLogged(
            request_id=request_id, registered_model_name=model, model_version=version, deployment_name="assistant"
        ),
    )


async def test_the_online_gate_rolls_a_worse_canary_back_from_feedback_on_kafka(
    tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]
) -> None:
    run = uuid.uuid4().hex[:8]
    model = f"assistant-{run}"
    jobs = [f"job-{run}-1", f"job-{run}-2"]
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id=f"registry-gate-{run}", request_timeout_ms=5000)
    s3 = S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )
    settings = RegistrySettings(
        data_dir=tmp_path / "registry",
        grpc_port=0,
        job_events_group=f"registry-jobs-{run}",
        promotion_group=f"registry-promotion-{run}",
        online_gate_group=f"registry-online-gate-{run}",
    )
    app = build_app(settings, Infrastructure(kafka=kafka, s3=s3), embedded_security("registry"))
    ours = {model, *jobs}
    subscriptions = [Subscription(s.topics, s.group_id, only_keys(ours, s.handler)) for s in app.host.subscriptions]
    assert any(s.group_id == settings.online_gate_group for s in subscriptions)
    host = ServiceHost(app.host.platform, app.host.registrations, settings, subscriptions, auth_hook=app.host.auth_hook)
    catalog = app.host.platform.catalog
    bus = KafkaEventBus(kafka)

    def publish(message: Any, key: str, source: str) -> Event:
        event = Event.create(message, key=key, source=source, catalog=catalog)
        bus.publish(event)
        return event

    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            await stub.CreateRegisteredModel(
                pb.CreateRegisteredModelRequest(
                    name=model,
                    task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                    label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
                )
            )
            await stub.SetPromotionPolicy(
                pb.SetPromotionPolicyRequest(
                    policy=pb.PromotionPolicy(
                        registered_model_name=model,
                        enabled=True,
                        target_alias="candidate",
                        baseline_alias="production",
                        metric_name="accuracy",
                        min_value=0.5,
                        online_gate=pb.OnlineGate(enabled=True, min_feedback=MIN_FEEDBACK, max_rate_drop=0.05),
                    )
                )
            )

            async def aliases() -> tuple[int, int]:
                found = await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=model))
                return found.aliases.get("candidate", 0), found.aliases.get("production", 0)

            model_dir = make_tiny_bert(tmp_path / "tiny", ["good", "bad"], ["negative", "positive"])
            for number, (job, accuracy) in enumerate(zip(jobs, (0.9, 0.8), strict=True), start=1):
                manifest = upload_job_output(app.host.platform.objects, model_dir, f"jobs/{job}", accuracy)
                publish(job_succeeded(job, model, f"jobs/{job}", manifest, accuracy), job, "training")

                async def on_canary(number: int = number) -> bool:
                    return (await aliases())[0] == number

                await eventually(on_canary, f"version {number} on the canary alias", timeout_s=90)
            assert await aliases() == (2, 1)  # v1 promoted at once (no production yet), v2 on canary

            # Serving's reply counts arrive on their own topic; both versions answered without errors.
            for version, succeeded in ((1, 40), (2, 9)):
                outcomes = events_pb2.GenerationOutcomes(
                    registered_model_name=model, model_version=version, deployment_name="assistant", succeeded=succeeded
                )
                publish(outcomes, model, "serving")
            database = app.host.platform.database

            async def outcomes_counted() -> bool:
                def count() -> int:
                    with database.transaction() as session:
                        return len(session.execute(select(OnlineOutcomeRow)).scalars().all())

                return await asyncio.to_thread(count) == 2

            await eventually(outcomes_counted, "the reply outcomes to be counted", timeout_s=60)

            # Production answers well, the canary badly: 5/6 against 1/6 positive.
            for i in range(MIN_FEEDBACK):
                kind = events_pb2.FEEDBACK_KIND_THUMBS_UP if i else events_pb2.FEEDBACK_KIND_THUMBS_DOWN
                publish(feedback(model, 1, f"{run}-p{i}", kind), model, "serving")
            first = publish(
                feedback(model, 2, f"{run}-c0", events_pb2.FEEDBACK_KIND_RATING, rating=5), model, "serving"
            )
            bus.publish(first)  # redelivered: counted once
            # The same generation rated again: its latest verdict replaces the first.
            publish(feedback(model, 2, f"{run}-c0", events_pb2.FEEDBACK_KIND_RATING, rating=1), model, "serving")
            publish(
                feedback(model, 2, f"{run}-c1", events_pb2.FEEDBACK_KIND_TEXT), model, "serving"
            )  # counts for neither
            for i in range(1, MIN_FEEDBACK):
                kind = events_pb2.FEEDBACK_KIND_REGENERATE if i % 2 else events_pb2.FEEDBACK_KIND_THUMBS_DOWN
                if i == MIN_FEEDBACK - 1:
                    kind = events_pb2.FEEDBACK_KIND_THUMBS_UP
                publish(feedback(model, 2, f"{run}-c{i + 1}", kind), model, "serving")

            async def rolled_back() -> bool:
                return await aliases() == (1, 1)

            await eventually(rolled_back, "the online gate to roll the canary back", timeout_s=90)
            history = await stub.GetAliasHistory(
                pb.GetAliasHistoryRequest(registered_model_name=model, alias="candidate")
            )
            change = history.changes[0]
            assert (change.cause, change.actor, change.from_version, change.to_version) == (
                pb.ALIAS_CHANGE_CAUSE_ONLINE_GATE,
                "online-gate",
                2,
                1,
            )
            online = change.decision.online
            assert (online.candidate_positive, online.candidate_negative) == (1, MIN_FEEDBACK - 1)
            assert (online.baseline_positive, online.baseline_negative) == (MIN_FEEDBACK - 1, 1)
            assert online.p_value < online.alpha == pytest.approx(0.05) and not change.decision.passed
            assert (online.candidate_succeeded, online.baseline_succeeded, online.candidate_failed) == (9, 40, 0)
            assert "rolled back" in change.reason
            version = await stub.GetModelVersion(
                pb.GetModelVersionRequest(
                    registered_model_name=model, selector=common_pb2.ModelVersionSelector(version=2)
                )
            )
            assert "rolled back" in version.rolled_back_reason
            production = await stub.GetAliasHistory(
                pb.GetAliasHistoryRequest(registered_model_name=model, alias="production")
            )
            assert [c.cause for c in production.changes] == [pb.ALIAS_CHANGE_CAUSE_ONLINE_GATE]
    finally:
        await host.stop()
        bus.close()
