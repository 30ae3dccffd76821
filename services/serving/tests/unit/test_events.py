"""Events on the in-process bus: alias changes hot-swap deployments (stale ones ignored); logged predictions
reach the outbox masked and inside the request's trace, a batch per transaction."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gristmill.api.events.v1 import events_pb2
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from gristmill.core.events import Event, MemoryEventBus, Outbox
from gristmill.core.events.topics import ALIAS_CHANGED, PREDICTION_LOGGED
from gristmill.core.host import ServiceHost
from gristmill.core.sql import Database
from gristmill.serving.app import ServingApp
from gristmill.serving.domain.predictions import PredictionRecord, TextPrediction
from gristmill.serving.events.prediction_log import OutboxPredictionSink
from services.serving.tests.support import build_fake_app, build_fake_host, wait_for


def alias_event(host: ServiceHost, *, to_version: int | None, sequence: int, model: str = "sentiment") -> Event:
    message = events_pb2.AliasChanged(registered_model_name=model, alias="production", sequence=sequence)
    if to_version is not None:
        message.to_version = to_version
    return Event.create(message, key=model, source="registry", catalog=host.platform.catalog)


def served_version(app: ServingApp) -> int:
    versions = app.service.manager.loaded_versions("default", "sentiment")
    return versions[0].version if versions else 0


async def test_alias_changes_swap_the_deployment_and_stale_ones_are_ignored(tmp_path: Path) -> None:
    app, source, _ = build_fake_app(tmp_path)
    host = app.host
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serving_pb2_grpc.ServingServiceStub(channel)
            await stub.CreateDeployment(
                serving_pb2.CreateDeploymentRequest(
                    deployment=serving_pb2.Deployment(registered_model_name="sentiment"), wait_until_ready=True
                )
            )
            assert served_version(app) == 1
            host.platform.bus.publish(alias_event(host, to_version=2, sequence=5))
            await wait_for(lambda: served_version(app) == 2)
            answer = await stub.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["good"]))
            assert answer.model_version == 2
            # An older event (sequence 4) arrives late: it must not move the deployment back.
            host.platform.bus.publish(alias_event(host, to_version=1, sequence=4))
            await wait_for(lambda: consumed_now(host) >= 2, timeout_s=10)
            await app.service.manager.wait_settled("default", "sentiment", 5)
            assert served_version(app) == 2
            # The same event delivered twice changes nothing either (the bus skips the known event-id).
            newer = alias_event(host, to_version=1, sequence=6)
            host.platform.bus.publish(newer)
            await wait_for(lambda: served_version(app) == 1)
            host.platform.bus.publish(newer)
            # Events for other models leave this deployment alone.
            source.add("other", 1)
            host.platform.bus.publish(alias_event(host, to_version=1, sequence=7, model="other"))
            await wait_for(lambda: consumed_now(host) >= 5, timeout_s=10)
            assert served_version(app) == 1
    finally:
        await host.stop()


def consumed_now(host: ServiceHost) -> int:
    """Alias-changed records the serving consumer group has handled (committed), over all partitions."""
    bus = host.platform.bus
    assert isinstance(bus, MemoryEventBus)
    return sum(bus.broker.committed("serving", ALIAS_CHANGED, p) for p in range(bus.broker.partitions))


async def test_logged_predictions_are_masked_and_continue_the_request_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app, _, _ = build_fake_app(tmp_path, tracer_provider=provider)
    host = app.host
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serving_pb2_grpc.ServingServiceStub(channel)
            await stub.CreateDeployment(
                serving_pb2.CreateDeploymentRequest(
                    deployment=serving_pb2.Deployment(
                        registered_model_name="sentiment",
                        prediction_logging=serving_pb2.PredictionLoggingConfig(sample_rate=0.0),
                    ),
                    wait_until_ready=True,
                )
            )
            texts = ["good, mail bob@example.com", "meh, call +1 (555) 010-9999", "bad"]
            await stub.Predict(serving_pb2.PredictRequest(model="sentiment", texts=texts, request_id="req-9"))
        assert app.sink.flush(5)
        host.relay.drain(5)
        bus = host.platform.bus
        assert isinstance(bus, MemoryEventBus)
        records = bus.broker.records(PREDICTION_LOGGED)
        # Only the uncertain one ("meh": top probability 0.55 < 0.6) is logged when nothing is sampled.
        assert len(records) == 1
        message = events_pb2.PredictionLogged.FromString(records[0].value or b"")
        assert message.masked_text == "meh, call [PHONE]"
        assert (message.request_id, message.index_in_request, message.model_version) == ("req-9", 1, 1)
        assert message.uncertain and not message.sampled
        assert dict(message.probabilities) == {"negative": pytest.approx(0.45), "positive": pytest.approx(0.55)}
        assert (message.deployment_name, message.labeling_project_id) == ("sentiment", "sentiment-project")
        headers = dict(records[0].headers)
        trace_id = headers["traceparent"].decode().split("-")[1]
        predict_spans = [s for s in exporter.get_finished_spans() if s.name.endswith("ServingService/Predict")]
        assert [format(s.context.trace_id, "032x") for s in predict_spans] == [trace_id]
    finally:
        await host.stop()


def test_predictions_logged_one_at_a_time_share_a_transaction_and_flush_does_not_wait_out_the_gathering(
    tmp_path: Path,
) -> None:
    host, _, _ = build_fake_host(tmp_path)
    database = Database(f"sqlite:///{tmp_path / 'sink.db'}")
    database.create_all()
    sink = OutboxPredictionSink(database, host.platform.catalog, linger_s=30.0)
    try:
        prediction = TextPrediction("positive", 1, ("positive",), (0.45, 0.55), 0.55, True)
        for index in range(5):
            sink.log(
                [
                    PredictionRecord(
                        "default",
                        "sentiment",
                        "sentiment",
                        1,
                        f"req-{index}",
                        0,
                        f"text {index}",
                        prediction,
                        ("negative", "positive"),
                        False,
                        "",
                    )
                ]
            )
        started = time.monotonic()
        assert sink.flush(10)
        assert time.monotonic() - started < 10  # the flush cut the 30 s gathering short
        assert (sink.written, sink.batches, sink.dropped) == (5, 1, 0)
        with database.transaction() as session:
            assert Outbox.pending(session) == 5
    finally:
        sink.close()
