"""The event loop on the in-process bus: a training job's SUCCEEDED event registers a version (once, however
often it is delivered), its ``model version registered`` event drives the promotion policy, and the
promotion's ``alias changed`` event continues the trace of the job event."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.api.training.v1 import training_pb2
from gristmill.core.errors import UnavailableError
from gristmill.core.events import Event, MemoryBroker, MemoryEventBus, OutboxRelay
from gristmill.core.events.bus import Consumer
from gristmill.core.host import Infrastructure, PeriodicTask
from gristmill.core.security import embedded_security
from gristmill.registry.app import RegistryApp, build_app, resume_pending_verifications
from gristmill.registry.domain.model import MetricGoal, ModelQuery, PromotionMode, PromotionPolicy, VersionStatus
from gristmill.registry.settings import RegistrySettings
from services.registry.tests.support import CALLER, SIGNATURE, upload_model


def _job_event(job_id: str, manifest: common_pb2.ObjectRef, prefix: str, *, accuracy: float, model: str = "reviews"):
    return events_pb2.JobStateChanged(
        job_id=job_id,
        state=training_pb2.JOB_STATE_SUCCEEDED,
        previous_state=training_pb2.JOB_STATE_RUNNING,
        metrics=[common_pb2.Metric(name="accuracy", value=accuracy, split=common_pb2.DATASET_SPLIT_TEST)],
        registered_model_name=model,
        artifact_prefix=prefix,
        manifest=manifest,
        signature=common_pb2.ModelSignature(
            inputs=[
                common_pb2.TensorSpec(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in SIGNATURE["inputs"]
            ],
            outputs=[
                common_pb2.TensorSpec(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in SIGNATURE["outputs"]
            ],
        ),
        task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
        label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
        lineage=common_pb2.Lineage(
            training_job_id=job_id,
            dataset_version=common_pb2.DatasetVersionRef(project_id="reviews", dataset_version_id="dv7"),
            base_model=common_pb2.BaseModelRef(base_model_name="minilm", content_sha256="c" * 64),
            hyper_parameters={"learning_rate": "2e-05", "method": "lora"},
        ),
        tags={"team": "nlp"},
    )


class Loop:
    """The app's consumers and outbox relay, stepped by hand."""

    def __init__(self, app: RegistryApp) -> None:
        self.app = app
        platform = app.host.platform
        self.bus = platform.bus
        self.relay = OutboxRelay(platform.database, self.bus)
        self.consumers: list[Consumer] = [
            self.bus.subscribe(sub.topics, sub.group_id, sub.handler) for sub in app.host.subscriptions
        ]

    def run(self) -> None:
        """Deliver until quiet: consume every topic, publish the outbox, repeat."""
        for _ in range(5):
            consumed = sum(c.poll_once(0.05) for c in self.consumers)
            published = self.relay.relay_once()
            if not consumed and not published:
                return

    def close(self) -> None:
        for c in self.consumers:
            c.stop()


def test_job_event_registers_once_promotes_and_keeps_the_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = MemoryBroker()
    settings = RegistrySettings(data_dir=tmp_path, grpc_port=0)
    app = build_app(
        settings, Infrastructure(memory_broker=broker, tracer_provider=provider), embedded_security("registry")
    )
    registry, objects = app.registry, app.host.platform.objects
    loop = Loop(app)
    training = MemoryEventBus(broker, tracer_provider=provider)
    catalog = app.host.platform.catalog

    registry.catalog.create_model(
        CALLER,
        name="reviews",
        description="",
        task="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=("negative", "positive"),
        tags={},
    )
    registry.promotions.set_policy(
        CALLER,
        PromotionPolicy(
            "reviews",
            True,
            "production",
            "accuracy",
            "test",
            MetricGoal.MAXIMIZE,
            "",
            0.005,
            None,
            PromotionMode.AUTOMATIC,
        ),
    )
    ref = upload_model(objects, "jobs/job-1")
    manifest = common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)
    message = _job_event("job-1", manifest, "jobs/job-1", accuracy=0.91)
    tracer = provider.get_tracer("training")
    with tracer.start_as_current_span("SubmitJob") as root:
        event = Event.create(message, key="job-1", source="training", catalog=catalog)
        training.publish(event)
    trace_id = root.get_span_context().trace_id
    loop.run()

    version = registry.catalog.get_version(CALLER, "reviews", version=None, alias="production")
    assert version.version == 1 and version.status is VersionStatus.READY
    assert version.lineage.training_job_id == "job-1" and version.lineage.hyper_parameters["method"] == "lora"
    assert version.lineage.base_model is not None and version.lineage.base_model.base_model_name == "minilm"
    assert version.tags == {"team": "nlp"} and version.created_by == "training"
    [alias_record] = broker.records(catalog.topic_for(events_pb2.AliasChanged))
    alias_event = Event.from_record(alias_record.topic, alias_record.key, alias_record.value, alias_record.headers)
    changed = catalog.decode(alias_event, events_pb2.AliasChanged)
    assert (changed.to_version, changed.actor, changed.cause) == (1, "policy", registry_pb2.ALIAS_CHANGE_CAUSE_POLICY)
    traceparent = dict(alias_event.trace_headers)["traceparent"].decode()
    assert traceparent.split("-")[1] == format(trace_id, "032x")

    # The same event again (a redelivery), and a second event for the same job (a duplicate): nothing new.
    training.publish(event)
    training.publish(Event.create(message, key="job-1", source="training", catalog=catalog))
    loop.run()
    assert registry.catalog.get_model(CALLER, "reviews").latest_version == 1
    assert len(broker.records(catalog.topic_for(events_pb2.ModelVersionRegistered))) == 1
    assert len(broker.records(catalog.topic_for(events_pb2.AliasChanged))) == 1

    # A job whose artifact was tampered with after its manifest was written: FAILED, never promoted.
    bad = upload_model(objects, "jobs/job-2")
    objects.put_bytes("jobs/job-2/model.safetensors", b"tampered", overwrite=True)
    bad_ref = common_pb2.ObjectRef(key=bad.key, sha256=bad.sha256, size_bytes=bad.size_bytes)
    training.publish(
        Event.create(
            _job_event("job-2", bad_ref, "jobs/job-2", accuracy=0.99), key="job-2", source="training", catalog=catalog
        )
    )
    # Not SUCCEEDED, or nothing to register: ignored.
    running = events_pb2.JobStateChanged(
        job_id="job-3", state=training_pb2.JOB_STATE_RUNNING, registered_model_name="reviews"
    )
    training.publish(Event.create(running, key="job-3", source="training", catalog=catalog))
    loop.run()
    failed = registry.catalog.get_version(CALLER, "reviews", version=2, alias=None)
    assert failed.status is VersionStatus.FAILED and "model.safetensors: sha256 mismatch" in failed.status_reason
    assert registry.catalog.get_model(CALLER, "reviews").latest_version == 2
    assert registry.catalog.get_model(CALLER, "reviews").aliases == {"production": 1}
    registered = broker.records(catalog.topic_for(events_pb2.ModelVersionRegistered))
    statuses = [events_pb2.ModelVersionRegistered.FromString(r.value or b"").status for r in registered]
    assert statuses == [registry_pb2.MODEL_VERSION_STATUS_READY, registry_pb2.MODEL_VERSION_STATUS_FAILED]
    loop.close()
    app.host.platform.close()


def test_a_chat_sft_job_registers_a_chat_model_with_its_adapter_and_template_hash(tmp_path: Path) -> None:
    broker = MemoryBroker()
    app = build_app(
        RegistrySettings(data_dir=tmp_path, grpc_port=0),
        Infrastructure(memory_broker=broker),
        embedded_security("registry"),
    )
    loop = Loop(app)
    objects, catalog = app.host.platform.objects, app.host.platform.catalog
    chat_signature = {
        "inputs": [{"name": "messages", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
    }
    adapter = {"adapter_model.safetensors": b"lora", "adapter_config.json": b"{}", "chat_template.jinja": b"{{ x }}"}
    ref = upload_model(objects, "jobs/job-c", files=adapter, labels=(), signature=chat_signature)
    message = _job_event(
        "job-c",
        common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes),
        "jobs/job-c",
        accuracy=0.0,
        model="assistant",
    )
    message.task = common_pb2.TASK_TYPE_CHAT
    message.label_map.Clear()
    del message.signature.inputs[:], message.signature.outputs[:], message.metrics[:]
    message.signature.inputs.add(name="messages", datatype="BYTES", shape=[-1])
    message.signature.outputs.add(name="text_output", datatype="BYTES", shape=[-1])
    message.metrics.add(name="loss", value=1.25, split=common_pb2.DATASET_SPLIT_TEST)
    message.lineage.hyper_parameters.update({"objective": "sft", "chat_template.sha256": "d" * 64})
    MemoryEventBus(broker).publish(Event.create(message, key="job-c", source="training", catalog=catalog))
    loop.run()

    model = app.registry.catalog.get_model(CALLER, "assistant")
    assert model.task == "TASK_TYPE_CHAT" and model.label_map == ()
    version = app.registry.catalog.get_version(CALLER, "assistant", version=1, alias=None)
    assert version.status is VersionStatus.READY, version.status_reason
    assert version.task == "TASK_TYPE_CHAT" and [s.name for s in version.signature.inputs] == ["messages"]
    assert version.lineage.hyper_parameters["chat_template.sha256"] == "d" * 64
    assert {f.key.rsplit("/", 1)[-1] for f in version.files} >= set(adapter)
    assert app.registry.catalog.search_models(CALLER, ModelQuery(task="TASK_TYPE_CHAT"), 0, "")[0] == [model]
    loop.close()
    app.host.platform.close()


def test_undecodable_or_invalid_job_events_are_dead_lettered(tmp_path: Path) -> None:
    broker = MemoryBroker()
    settings = RegistrySettings(data_dir=tmp_path, grpc_port=0, job_events_group=f"g-{uuid.uuid4().hex[:6]}")
    app = build_app(settings, Infrastructure(memory_broker=broker), embedded_security("registry"))
    loop = Loop(app)
    catalog = app.host.platform.catalog
    producer = MemoryEventBus(broker)
    bad_name = events_pb2.JobStateChanged(
        job_id="job-9",
        state=training_pb2.JOB_STATE_SUCCEEDED,
        registered_model_name="Bad Name!",
        artifact_prefix="jobs/job-9",
        manifest=common_pb2.ObjectRef(key="jobs/job-9/manifest.json", sha256="0" * 64),
    )
    producer.publish(Event.create(bad_name, key="job-9", source="training", catalog=catalog))
    loop.run()
    topic = catalog.topic_for(events_pb2.JobStateChanged)
    [dead] = broker.records(topic + ".dlq")
    assert b"registered model name" in dict(dead.headers)["error"]
    assert app.registry.catalog.search_models(CALLER, ModelQuery(), 0, "") == ([], "")  # nothing was written
    loop.close()
    app.host.platform.close()


def test_storage_outage_leaves_the_version_pending_until_the_retry_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = MemoryBroker()
    app = build_app(
        RegistrySettings(data_dir=tmp_path, grpc_port=0),
        Infrastructure(memory_broker=broker),
        embedded_security("registry"),
    )
    loop = Loop(app)
    objects, catalog = app.host.platform.objects, app.host.platform.catalog
    ref = upload_model(objects, "jobs/job-5")
    manifest = common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)
    healthy_get_file = objects.get_file

    def down(*args: object, **kwargs: object) -> object:
        raise UnavailableError("the S3 server at s3:8333 cannot be reached")

    monkeypatch.setattr(objects, "get_file", down)
    MemoryEventBus(broker).publish(
        Event.create(
            _job_event("job-5", manifest, "jobs/job-5", accuracy=0.9), key="job-5", source="training", catalog=catalog
        )
    )
    loop.run()
    topic = catalog.topic_for(events_pb2.JobStateChanged)
    assert broker.records(topic + ".dlq") == []  # an outage is not the event's fault
    pending = app.registry.catalog.get_version(CALLER, "reviews", version=1, alias=None)
    assert pending.status is VersionStatus.PENDING
    assert (
        app.registry.registrations.resume_pending(min_age_s=3600) == 0
    )  # too fresh: maybe still being copied elsewhere

    monkeypatch.setattr(objects, "get_file", healthy_get_file)
    # The host runs this task in every mode (it used to be a thread of the registry's __main__ only).
    assert [task.name for task in app.host.tasks] == ["retry-verifications"]
    retry = PeriodicTask("retry", resume_pending_verifications(app.registry.registrations, 0.0), 0.05)
    retry.start()
    try:
        for _ in range(100):
            if app.registry.catalog.get_version(CALLER, "reviews", version=1, alias=None).status is VersionStatus.READY:
                break
            time.sleep(0.05)
    finally:
        retry.stop()
    assert app.registry.catalog.get_version(CALLER, "reviews", version=1, alias=None).status is VersionStatus.READY
    loop.run()
    registered = broker.records(catalog.topic_for(events_pb2.ModelVersionRegistered))
    assert len(registered) == 1  # announced once, when it finally finished
    loop.close()
    app.host.platform.close()
