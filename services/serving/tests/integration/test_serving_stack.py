"""The issue's "done when", on the real stack: real gRPC ports, the Kafka broker, the S3 server, and the real
registry service (started in-process with its ``build_app`` on port 0).

Two tiny BERT versions are uploaded to S3 and registered in the registry; ``production`` points at version 1.
A serving deployment follows the alias: it loads version 1 through the registry's download manifest (files
from S3, checksums verified) and answers the typed Predict, raw Open Inference Protocol messages and the
real ``tritonclient.grpc`` client. Moving the alias in the registry while a load generator runs swaps to
version 2 with zero failed requests. A canary holds its weight over 2,000 calls, and logged predictions
reach Kafka PII-masked.

The platform topics are shared with everyone's tests: every id here is unique to the run and the consumers
only handle this run's records.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2
from pydantic import SecretStr
from sqlalchemy.orm import Session

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.registry.v1 import registry_pb2, registry_pb2_grpc
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from gristmill.core.events import Event, KafkaEventBus
from gristmill.core.events.bus import Handler
from gristmill.core.events.topics import PREDICTION_LOGGED
from gristmill.core.host import Infrastructure, ServiceHost, Subscription
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.sql import Database
from gristmill.core.storage import ObjectStore
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from gristmill.serving.app import ServingApp
from gristmill.serving.app import build_app as build_serving
from gristmill.serving.settings import ServingSettings
from tests.support.job_output import upload_job_output
from tests.support.licences import signed_license
from tests.support.tiny_model import make_tiny_bert

pytestmark = pytest.mark.integration

LABELS = ["negative", "positive"]
TEXTS = [
    "the food was great and the staff were lovely",
    "terrible service and cold food",
    "not bad at all",
    "boring and far too long",
    "call me at +1 (555) 010-9999 please",
]
SIGNATURE = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[-1])],
    outputs=[
        common_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        common_pb2.TensorSpec(name="label", datatype="BYTES", shape=[-1]),
        common_pb2.TensorSpec(name="label_index", datatype="INT64", shape=[-1]),
    ],
)


def only_keys(keys: set[str], handler: Handler) -> Handler:
    def handle(event: Event, session: Session) -> None:
        if event.key in keys:
            handler(event, session)

    return handle


@dataclass
class Stack:
    model: str
    registry: registry_pb2_grpc.RegistryServiceStub
    serving: serving_pb2_grpc.ServingServiceStub
    oip: oip_grpc.GRPCInferenceServiceStub
    serving_port: int
    serving_host: ServiceHost
    serving_app: ServingApp
    logged: list[events_pb2.PredictionLogged]
    logged_arrived: threading.Event
    kafka: KafkaSettings


@pytest.fixture
async def stack(tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]) -> AsyncIterator[Stack]:
    run = uuid.uuid4().hex[:8]
    model = f"sentiment-{run}"
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id=f"serving-test-{run}", request_timeout_ms=5000)
    s3 = S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )
    # The real registry; its consumers (training events, promotion policy) play no part here.
    registry_settings = RegistrySettings(data_dir=tmp_path / "registry", grpc_port=0)
    infra = Infrastructure(kafka=kafka, s3=s3)
    registry_app = build_app(registry_settings, infra, embedded_security("registry"))
    registry_host = ServiceHost(
        registry_app.host.platform,
        registry_app.host.registrations,
        registry_settings,
        [],
        auth_hook=registry_app.host.auth_hook,
    )
    registry_port = await registry_host.start()

    settings = ServingSettings(
        data_dir=tmp_path / "serving",
        grpc_port=0,
        registry_address=f"127.0.0.1:{registry_port}",
        consumer_group=f"serving-{run}",
        shutdown_grace_s=2.0,
    )
    serving_app = build_serving(settings, infra, embedded_security("serving", signed_license()))
    built = serving_app.host
    serving_host = ServiceHost(
        built.platform,
        built.registrations,
        settings,
        [Subscription(s.topics, s.group_id, only_keys({model}, s.handler)) for s in built.subscriptions],
        auth_hook=built.auth_hook,
        components=built.components,
    )

    # What labeling would see: this run's logged predictions, read by a consumer group of its own.
    logged: list[events_pb2.PredictionLogged] = []
    arrived = threading.Event()
    watcher_db = Database(f"sqlite:///{tmp_path / 'watcher.db'}")
    watcher_db.create_all()
    watcher_bus = KafkaEventBus(kafka, database=watcher_db)

    def watch(event: Event, session: Session) -> None:
        if event.key == model:
            logged.append(events_pb2.PredictionLogged.FromString(event.payload))
            arrived.set()

    watcher = watcher_bus.subscribe([PREDICTION_LOGGED], f"labeling-watch-{run}", watch).run_in_background()
    serving_port = await serving_host.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{registry_port}") as registry_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{serving_port}") as serving_channel,
        ):
            yield Stack(
                model,
                registry_pb2_grpc.RegistryServiceStub(registry_channel),
                serving_pb2_grpc.ServingServiceStub(serving_channel),
                oip_grpc.GRPCInferenceServiceStub(serving_channel),
                serving_port,
                serving_host,
                serving_app,
                logged,
                arrived,
                kafka,
            )
    finally:
        await serving_host.stop()
        await registry_host.stop()
        watcher.stop()
        watcher_bus.close()
        watcher_db.dispose()


async def register(stack: Stack, objects: ObjectStore, model_dir: Path, job: str) -> int:
    manifest = upload_job_output(objects, model_dir, f"jobs/{job}")
    version = await stack.registry.RegisterModelVersion(
        registry_pb2.RegisterModelVersionRequest(
            registered_model_name=stack.model,
            create_model_if_missing=True,
            source_prefix=f"jobs/{job}",
            manifest=manifest,
            task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            label_map=common_pb2.LabelMap(labels=LABELS),
            signature=SIGNATURE,
            lineage=common_pb2.Lineage(
                training_job_id=job,
                dataset_version=common_pb2.DatasetVersionRef(project_id="reviews", dataset_version_id="dv-1"),
                hyper_parameters={"max_length": "64"},
            ),
            wait_for_verification=True,
        ),
        timeout=60,
    )
    assert version.status == registry_pb2.MODEL_VERSION_STATUS_READY, version.status_reason
    return version.version


def bytes_tensor(texts: list[bytes]) -> bytes:
    return b"".join(len(t).to_bytes(4, "little") + t for t in texts)


def triton_calls(port: int, model: str) -> dict[str, Any]:
    """The real tritonclient, unchanged, against our server (blocking: run it on a thread)."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        text = triton.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([TEXTS[0].encode(), TEXTS[1].encode()], dtype=np.object_))
        result = client.infer(
            model,
            inputs=[text],
            outputs=[triton.InferRequestedOutput(n) for n in ("probabilities", "label", "label_index")],
        )
        return {
            "live": client.is_server_live(),
            "ready": client.is_model_ready(model),
            "metadata": client.get_model_metadata(model),
            "probabilities": result.as_numpy("probabilities"),
            "label": result.as_numpy("label"),
            "label_index": result.as_numpy("label_index"),
            "version": result.get_response().model_version,
        }
    finally:
        client.close()


async def test_registry_alias_to_served_model_with_hot_swap_canary_and_logging(stack: Stack, tmp_path: Path) -> None:
    objects = stack.serving_host.platform.objects
    run = stack.model.rsplit("-", 1)[-1]
    v1 = await register(stack, objects, make_tiny_bert(tmp_path / "v1", TEXTS, LABELS, seed=1), f"job-{run}-1")
    v2 = await register(stack, objects, make_tiny_bert(tmp_path / "v2", TEXTS, LABELS, seed=2), f"job-{run}-2")
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=v1)
    )

    # A deployment that follows "production": loaded from the registry's manifest (S3, checksums verified).
    deployment = await stack.serving.CreateDeployment(
        serving_pb2.CreateDeploymentRequest(
            deployment=serving_pb2.Deployment(
                name="reviews",
                registered_model_name=stack.model,
                batching=serving_pb2.BatchingConfig(max_batch_size=16, max_delay_ms=2),
                prediction_logging=serving_pb2.PredictionLoggingConfig(uncertainty_threshold=0.0),
            ),
            wait_until_ready=True,
        ),
        timeout=120,
    )
    assert deployment.status.state == serving_pb2.DEPLOYMENT_STATE_READY, deployment.status.message
    assert [v.version for v in deployment.status.versions] == [v1]

    # Typed Predict.
    predicted = await stack.serving.Predict(serving_pb2.PredictRequest(model="reviews", texts=TEXTS[:2]))
    assert (predicted.registered_model_name, predicted.model_version) == (stack.model, v1)
    assert all(p.label in LABELS and sum(p.probabilities.values()) == pytest.approx(1.0) for p in predicted.predictions)

    # Raw Open Inference Protocol messages.
    raw = await stack.oip.ModelInfer(
        oip.ModelInferRequest(
            model_name="reviews",
            id="raw-1",
            inputs=[oip.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2, 1])],
            raw_input_contents=[bytes_tensor([TEXTS[0].encode(), TEXTS[1].encode()])],
        )
    )
    assert (raw.model_version, raw.id) == (str(v1), "raw-1")
    probabilities = np.frombuffer(raw.raw_output_contents[0], dtype="<f4").reshape(2, 2)
    typed_probabilities = [[p.probabilities[label] for label in LABELS] for p in predicted.predictions]
    assert probabilities == pytest.approx(np.asarray(typed_probabilities), abs=1e-6)

    # The real tritonclient.
    triton = await asyncio.to_thread(triton_calls, stack.serving_port, "reviews")
    assert triton["live"] and triton["ready"] and triton["version"] == str(v1)
    assert [i.name for i in triton["metadata"].inputs] == ["text"]
    assert [o.name for o in triton["metadata"].outputs] == ["probabilities", "label", "label_index"]
    assert triton["probabilities"].shape == (2, 2) and triton["probabilities"] == pytest.approx(probabilities, abs=1e-6)
    assert [label.decode() for label in triton["label"]] == [LABELS[i] for i in triton["label_index"]]

    # Move the alias in the registry while a load generator runs: no request fails, answers switch version.
    answers: list[tuple[float, int]] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(index: int) -> None:
        while not stop.is_set():
            try:
                response = await stack.serving.Predict(
                    serving_pb2.PredictRequest(model="reviews", texts=[TEXTS[index % 4]]), timeout=10
                )
                answers.append((time.monotonic(), response.model_version))
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    await asyncio.sleep(1.0)
    moved = await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=v2)
    )
    assert moved.changed
    deadline = time.monotonic() + 60
    while not any(version == v2 for _, version in answers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    versions = [version for _, version in answers]
    assert versions[0] == v1 and v2 in versions, Counter(versions)
    first_v2 = versions.index(v2)
    assert len(answers) > 100 and set(versions[first_v2 + 50 :]) == {v2}
    status = await stack.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="reviews"))
    assert [v.version for v in status.status.versions if v.state == serving_pb2.LOADED_VERSION_STATE_READY] == [v2]

    # Canary: version 1 takes 20% of requests; over 2,000 calls its share stays within 3 points.
    updated = await stack.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name="reviews",
            deployment=serving_pb2.Deployment(
                canary=serving_pb2.CanaryRoute(target=common_pb2.ModelVersionSelector(version=v1), weight=0.2)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["canary"]),
            wait_until_ready=True,
        ),
        timeout=120,
    )
    assert {v.version: v.traffic_weight for v in updated.status.versions} == {
        v2: pytest.approx(0.8),
        v1: pytest.approx(0.2),
    }
    before = {v.version: v.request_count for v in updated.status.versions}
    semaphore = asyncio.Semaphore(16)

    async def call(index: int) -> int:
        async with semaphore:
            response = await stack.serving.Predict(
                serving_pb2.PredictRequest(model="reviews", texts=[TEXTS[index % 4]])
            )
            return response.model_version

    split = Counter(await asyncio.gather(*(call(i) for i in range(2000))))
    assert split[v1] + split[v2] == 2000
    assert split[v1] / 2000 == pytest.approx(0.2, abs=0.03), split
    counted = await stack.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="reviews"))
    per_version = {v.version: v.request_count - before.get(v.version, 0) for v in counted.status.versions}
    assert per_version == {v1: split[v1], v2: split[v2]}
    assert all(v.latency_p50_ms > 0 and v.error_count == 0 for v in counted.status.versions)

    # Prediction logging: every prediction sampled; the text reaches Kafka masked, with its lineage.
    await stack.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name="reviews",
            deployment=serving_pb2.Deployment(
                prediction_logging=serving_pb2.PredictionLoggingConfig(sample_rate=1.0, uncertainty_threshold=0.0)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["prediction_logging", "canary"]),
        )
    )
    await stack.serving.Predict(serving_pb2.PredictRequest(model="reviews", texts=[TEXTS[4]], request_id="pii-1"))
    assert await asyncio.to_thread(stack.logged_arrived.wait, 60), "no prediction-logged event reached Kafka"
    event = stack.logged[0]
    assert event.masked_text == "call me at [PHONE] please"
    assert (event.request_id, event.model_version, event.deployment_name) == ("pii-1", v2, "reviews")
    assert event.sampled and event.labeling_project_id == "reviews"
