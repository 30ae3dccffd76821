"""The issue's "done when", on the real stack: real gRPC, the Kafka broker and the S3 server.

A training job's SUCCEEDED event, published the way training publishes it (``Event.create`` through a
``KafkaEventBus``, inside a client span) with real artifacts in S3 (a tiny BERT and a manifest), becomes a
READY version with lineage; the promotion policy moves ``production`` to it; ``alias changed`` reaches
Kafka carrying the trace of the job event; a redelivered (and a duplicated) event creates nothing; a job
whose artifact was tampered with ends FAILED and is not promoted.

The platform topics are shared with everyone's tests, so every id here is unique to the run and the
registry's consumers only handle this run's records.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.api.training.v1 import training_pb2
from gristmill.core.events import Event, HandledEvent, KafkaEventBus, OutboxEvent
from gristmill.core.events.bus import Handler
from gristmill.core.host import Infrastructure, ServiceHost, Subscription
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.sql import Database
from gristmill.core.storage import ObjectStore
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from tests.support.job_output import upload_job_output as upload_files_and_manifest
from tests.support.tiny_model import make_tiny_bert

pytestmark = pytest.mark.integration

LABELS = ["negative", "positive"]
TEXTS = ["a great movie", "a terrible film", "not bad at all", "boring and long"]
SIGNATURE = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[-1])],
    outputs=[common_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2])],
)


def upload_job_output(objects: ObjectStore, model_dir: Path, prefix: str, accuracy: float) -> common_pb2.ObjectRef:
    """What a finished training job leaves in the object store: its files and a manifest listing them."""
    return upload_files_and_manifest(
        objects, model_dir, prefix, label_map=LABELS, metrics={"accuracy/test": accuracy}, base_model="tiny-bert"
    )


def job_succeeded(job_id: str, model: str, prefix: str, manifest: common_pb2.ObjectRef, accuracy: float) -> Any:
    return events_pb2.JobStateChanged(
        job_id=job_id,
        state=training_pb2.JOB_STATE_SUCCEEDED,
        previous_state=training_pb2.JOB_STATE_RUNNING,
        metrics=[common_pb2.Metric(name="accuracy", value=accuracy, split=common_pb2.DATASET_SPLIT_TEST)],
        registered_model_name=model,
        artifact_prefix=prefix,
        manifest=manifest,
        signature=SIGNATURE,
        task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
        label_map=common_pb2.LabelMap(labels=LABELS),
        lineage=common_pb2.Lineage(
            training_job_id=job_id,
            dataset_version=common_pb2.DatasetVersionRef(project_id="reviews", dataset_version_id="dv-1"),
            base_model=common_pb2.BaseModelRef(object_prefix="base-models/tiny-bert", content_sha256="b" * 64),
            hyper_parameters={"learning_rate": "2e-05", "epochs": "1", "method": "full"},
            ray_run_name=job_id,
            code_version="gristmill-training 0.1.0",
        ),
    )


def only_keys(keys: set[str], handler: Handler) -> Handler:
    """The topics are shared: handle this run's records, acknowledge everyone else's."""

    def handle(event: Event, session: Session) -> None:
        if event.key in keys:
            handler(event, session)

    return handle


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = await check()
            if result:
                return result
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_job_event_to_promoted_version_on_kafka_and_s3(
    tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str], tracing: tuple[TracerProvider, Any]
) -> None:
    provider, _ = tracing
    run = uuid.uuid4().hex[:8]
    model, job1, job2 = f"reviews-{run}", f"job-{run}-1", f"job-{run}-2"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id=f"registry-test-{run}", request_timeout_ms=5000)
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
    )
    app = build_app(
        settings, Infrastructure(kafka=kafka, s3=s3, tracer_provider=provider), embedded_security("registry")
    )
    ours = {model, job1, job2}
    subscriptions = [Subscription(s.topics, s.group_id, only_keys(ours, s.handler)) for s in app.host.subscriptions]
    host = ServiceHost(app.host.platform, app.host.registrations, settings, subscriptions, auth_hook=app.host.auth_hook)
    objects = app.host.platform.objects
    catalog = app.host.platform.catalog

    # What serving would see: alias changes for this model, read by a consumer group of its own.
    seen: list[Event] = []
    arrived = threading.Event()
    watcher_db = Database(f"sqlite:///{tmp_path / 'watcher.db'}")
    watcher_db.create_all()
    watcher_bus = KafkaEventBus(kafka, database=watcher_db, tracer_provider=provider)

    def watch(event: Event, session: Session) -> None:
        if event.key == model:
            seen.append(event)
            arrived.set()

    watcher = watcher_bus.subscribe(
        [catalog.topic_for(events_pb2.AliasChanged)], f"serving-watch-{run}", watch
    ).run_in_background()
    training_bus = KafkaEventBus(kafka, tracer_provider=provider)

    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            await stub.CreateRegisteredModel(
                pb.CreateRegisteredModelRequest(
                    name=model,
                    task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                    label_map=common_pb2.LabelMap(labels=LABELS),
                )
            )
            await stub.SetPromotionPolicy(
                pb.SetPromotionPolicyRequest(
                    policy=pb.PromotionPolicy(
                        registered_model_name=model,
                        enabled=True,
                        target_alias="production",
                        metric_name="accuracy",
                        min_improvement=0.005,
                    )
                )
            )

            # Training finished job 1: its artifacts are in S3 and it announces success.
            model_dir = make_tiny_bert(tmp_path / "tiny", TEXTS, LABELS)
            manifest1 = upload_job_output(objects, model_dir, f"jobs/{job1}", accuracy=0.91)
            tracer = provider.get_tracer("training")
            with tracer.start_as_current_span("training.CompleteJob", kind=SpanKind.CLIENT) as span:
                event1 = Event.create(
                    job_succeeded(job1, model, f"jobs/{job1}", manifest1, 0.91),
                    key=job1,
                    source="training",
                    catalog=catalog,
                )
                training_bus.publish(event1)
            trace_id = format(span.get_span_context().trace_id, "032x")

            async def promoted() -> pb.ModelVersion | None:
                found: pb.ModelVersion = await stub.GetModelVersion(
                    pb.GetModelVersionRequest(
                        registered_model_name=model, selector=common_pb2.ModelVersionSelector(alias="production")
                    )
                )
                return found

            version = await eventually(promoted, "the policy to promote version 1")
            assert version.version == 1 and version.status == pb.MODEL_VERSION_STATUS_READY
            assert version.lineage.training_job_id == job1
            assert version.lineage.dataset_version.dataset_version_id == "dv-1"
            assert version.lineage.hyper_parameters["method"] == "full"
            assert version.lineage.base_model.content_sha256 == "b" * 64
            assert version.created_by == "training" and list(version.aliases) == ["production"]
            names = sorted(f.key.rsplit("/", 1)[-1] for f in version.files)
            assert "model.safetensors" in names and "config.json" in names
            # The verified copies in S3 match their checksums, and the download manifest names them.
            download = await stub.GetDownloadManifest(
                pb.GetDownloadManifestRequest(
                    registered_model_name=model, selector=common_pb2.ModelVersionSelector(alias="production")
                )
            )
            assert download.artifact_prefix == f"models/{model}/1/" and len(download.files) == len(version.files)
            for ref in download.files:
                assert len(objects.get_bytes(ref.key, expected_sha256=ref.sha256)) == ref.size_bytes
            history = await stub.GetAliasHistory(pb.GetAliasHistoryRequest(registered_model_name=model))
            [change] = history.changes
            assert (change.actor, change.cause, change.to_version) == ("policy", pb.ALIAS_CHANGE_CAUSE_POLICY, 1)
            assert change.decision.passed and change.decision.candidate_value == pytest.approx(0.91)

            # Serving sees the alias change on Kafka, in the trace the training job started.
            assert await asyncio.to_thread(arrived.wait, 90), "alias changed never reached Kafka"
            alias_event = seen[0]
            changed = catalog.decode(alias_event, events_pb2.AliasChanged)
            assert (changed.alias, changed.to_version, changed.sequence) == ("production", 1, change.sequence)
            traceparent = dict(alias_event.trace_headers)["traceparent"].decode()
            assert traceparent.split("-")[1] == trace_id

            # The same event delivered again, then a second event for the same job: nothing new.
            training_bus.publish(event1)
            duplicate = Event.create(
                job_succeeded(job1, model, f"jobs/{job1}", manifest1, 0.91),
                key=job1,
                source="training",
                catalog=catalog,
            )
            training_bus.publish(duplicate)
            database = app.host.platform.database

            async def duplicate_handled() -> bool:
                def check() -> bool:
                    with database.transaction() as session:
                        found = session.execute(
                            select(HandledEvent).where(HandledEvent.event_id == duplicate.event_id)
                        ).first()
                    return found is not None

                return await asyncio.to_thread(check)

            await eventually(duplicate_handled, "the duplicate job event to be handled")
            model_now = await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=model))
            assert model_now.latest_version == 1
            with database.transaction() as session:
                registered_events = session.execute(
                    select(func.count())
                    .select_from(OutboxEvent)
                    .where(
                        OutboxEvent.key == model,
                        OutboxEvent.topic == catalog.topic_for(events_pb2.ModelVersionRegistered),
                    )
                ).scalar_one()
            assert registered_events == 1

            # Job 2's weights were changed after its manifest was written: FAILED, and not promoted.
            manifest2 = upload_job_output(objects, model_dir, f"jobs/{job2}", accuracy=0.99)
            objects.put_bytes(f"jobs/{job2}/model.safetensors", b"not the weights that were trained", overwrite=True)
            training_bus.publish(
                Event.create(
                    job_succeeded(job2, model, f"jobs/{job2}", manifest2, 0.99),
                    key=job2,
                    source="training",
                    catalog=catalog,
                )
            )

            async def failed() -> pb.ModelVersion | None:
                found: pb.ModelVersion = await stub.GetModelVersion(
                    pb.GetModelVersionRequest(
                        registered_model_name=model, selector=common_pb2.ModelVersionSelector(version=2)
                    )
                )
                return found if found.status != pb.MODEL_VERSION_STATUS_PENDING else None

            version2 = await eventually(failed, "version 2 to finish verification")
            assert version2.status == pb.MODEL_VERSION_STATUS_FAILED
            assert "model.safetensors: sha256 mismatch" in version2.status_reason
            assert list(objects.list(f"models/{model}/2/")) == []
            await asyncio.sleep(1.0)  # give the policy consumer the FAILED event; it must not move anything
            model_now = await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=model))
            assert dict(model_now.aliases) == {"production": 1}
            assert len(seen) == 1
    finally:
        await host.stop()
        watcher.stop()
        watcher_bus.close()
        training_bus.close()
        watcher_db.dispose()
