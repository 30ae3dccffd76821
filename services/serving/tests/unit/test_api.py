"""Both gRPC APIs over a real loopback port, on the in-process platform with a fake model: every RPC's
answers, and a status (never INTERNAL) for each kind of bad input."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gristmill.api.common.v1 import common_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving.tests.support import FakeLoader, FakeSource, build_fake_host, wait_for

Code = grpc.StatusCode


@dataclass
class Api:
    serving: serving_pb2_grpc.ServingServiceStub
    oip: oip_grpc.GRPCInferenceServiceStub
    channel: grpc.aio.Channel
    source: FakeSource
    loader: FakeLoader


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    host, source, loader = build_fake_host(tmp_path)
    port = await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Api(
            serving_pb2_grpc.ServingServiceStub(channel),
            oip_grpc.GRPCInferenceServiceStub(channel),
            channel,
            source,
            loader,
        )
    await host.stop()


async def create(api: Api, name: str = "sentiment", **fields: object) -> serving_pb2.Deployment:
    deployment = serving_pb2.Deployment(name=name, registered_model_name="sentiment", **fields)  # type: ignore[arg-type]
    return await api.serving.CreateDeployment(
        serving_pb2.CreateDeploymentRequest(deployment=deployment, wait_until_ready=True), timeout=10
    )


async def expect(code: grpc.StatusCode, call: object, match: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    assert failure.value.code() == code, failure.value.details()
    details = failure.value.details() or ""
    assert match in details, details
    return details


def bytes_tensor(texts: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + t for t in texts)


def infer_request(
    texts: list[str], *, model: str = "sentiment", shape: list[int] | None = None
) -> oip.ModelInferRequest:
    data = [t.encode() for t in texts]
    return oip.ModelInferRequest(
        model_name=model,
        id="req-1",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=shape or [len(data)])],
        raw_input_contents=[bytes_tensor(data)],
    )


# -- deployments ------------------------------------------------------------------------------------------------


async def test_create_fills_defaults_and_reports_the_loaded_version(api: Api) -> None:
    deployment = await create(api)
    assert deployment.status.state == serving_pb2.DEPLOYMENT_STATE_READY
    assert deployment.target.alias == "production"
    assert (deployment.batching.max_batch_size, deployment.batching.max_delay_ms) == (32, 5)
    assert deployment.batching.max_queue_size == 2048
    assert deployment.quantization == serving_pb2.QUANTIZATION_NONE
    assert deployment.length_policy.over_length_action == serving_pb2.OVER_LENGTH_ACTION_TRUNCATE
    assert deployment.prediction_logging.uncertainty_threshold == pytest.approx(0.6)
    assert deployment.organization_id == "default"
    (version,) = deployment.status.versions
    assert (version.version, version.state, version.traffic_weight) == (1, serving_pb2.LOADED_VERSION_STATE_READY, 1.0)
    assert version.memory_bytes == 1000 and version.ready_time.seconds > 0
    got = await api.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="sentiment"))
    assert got.status.state == serving_pb2.DEPLOYMENT_STATE_READY


async def test_create_answers_bad_input_with_actionable_statuses(api: Api) -> None:
    call = api.serving.CreateDeployment
    await expect(Code.INVALID_ARGUMENT, call(serving_pb2.CreateDeploymentRequest()), "deployment is required")
    await expect(
        Code.INVALID_ARGUMENT,
        call(serving_pb2.CreateDeploymentRequest(deployment=serving_pb2.Deployment(name="x"))),
        "registered_model_name is required",
    )
    cases = [
        (Code.NOT_FOUND, {"registered_model_name": "unknown"}, "no alias"),
        (Code.INVALID_ARGUMENT, {"registered_model_name": "Bad Name"}, "not valid"),
        (Code.INVALID_ARGUMENT, {"canary": serving_pb2.CanaryRoute(weight=0.2)}, "canary.target needs"),
        (
            Code.INVALID_ARGUMENT,
            {"canary": serving_pb2.CanaryRoute(target=common_pb2.ModelVersionSelector(version=2), weight=1.0)},
            "canary.weight",
        ),
        (Code.INVALID_ARGUMENT, {"batching": serving_pb2.BatchingConfig(max_batch_size=5000)}, "max_batch_size"),
        (Code.INVALID_ARGUMENT, {"length_policy": serving_pb2.LengthPolicy(max_tokens=-1)}, "max_tokens"),
        (Code.INVALID_ARGUMENT, {"quantization": 7}, "quantization"),
        (Code.INVALID_ARGUMENT, {"organization_id": "acme"}, "not your organisation"),
        (Code.NOT_FOUND, {"target": common_pb2.ModelVersionSelector(version=5)}, "no version 5"),
    ]
    for code, fields, message in cases:
        deployment = serving_pb2.Deployment(name="x", registered_model_name="sentiment")
        for key, value in fields.items():
            if isinstance(value, (str, int)):
                setattr(deployment, key, value)
            else:
                getattr(deployment, key).CopyFrom(value)
        await expect(code, call(serving_pb2.CreateDeploymentRequest(deployment=deployment)), message)
    api.source.not_ready.add(("sentiment", 2))
    await expect(
        Code.FAILED_PRECONDITION,
        create(api, "x", target=common_pb2.ModelVersionSelector(version=2)),
        "not READY",
    )
    await create(api)
    await expect(Code.ALREADY_EXISTS, create(api), "already exists")
    listed = await api.serving.ListDeployments(serving_pb2.ListDeploymentsRequest())
    assert [d.name for d in listed.deployments] == ["sentiment"], "a refused create must store nothing"


async def test_update_replaces_the_masked_fields_only(api: Api) -> None:
    await create(api)
    canary = serving_pb2.CanaryRoute(target=common_pb2.ModelVersionSelector(version=2), weight=0.3)
    updated = await api.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name="sentiment",
            deployment=serving_pb2.Deployment(
                canary=canary, batching=serving_pb2.BatchingConfig(max_batch_size=8), quantization=2
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["canary", "batching.max_batch_size"]),
            wait_until_ready=True,
        ),
        timeout=10,
    )
    assert updated.canary.weight == pytest.approx(0.3) and updated.canary.target.version == 2
    assert updated.batching.max_batch_size == 8 and updated.batching.max_delay_ms == 5
    assert updated.quantization == serving_pb2.QUANTIZATION_NONE, "quantization was not in the mask"
    assert {v.version: v.traffic_weight for v in updated.status.versions} == {
        1: pytest.approx(0.7),
        2: pytest.approx(0.3),
    }
    removed = await api.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name="sentiment",
            deployment=serving_pb2.Deployment(),
            update_mask=field_mask_pb2.FieldMask(paths=["canary"]),
        )
    )
    assert not removed.HasField("canary")
    # A masked optional field left unset goes back to its documented default (5 ms).
    await api.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name="sentiment",
            deployment=serving_pb2.Deployment(batching=serving_pb2.BatchingConfig(max_delay_ms=0)),
            update_mask=field_mask_pb2.FieldMask(paths=["batching.max_delay_ms"]),
        )
    )
    reset = await api.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name="sentiment",
            deployment=serving_pb2.Deployment(),
            update_mask=field_mask_pb2.FieldMask(paths=["batching.max_delay_ms"]),
        )
    )
    assert (reset.batching.max_delay_ms, reset.batching.max_batch_size) == (5, 8)


async def test_update_answers_bad_input(api: Api) -> None:
    await create(api)
    call = api.serving.UpdateDeployment
    mask = field_mask_pb2.FieldMask
    await expect(Code.INVALID_ARGUMENT, call(serving_pb2.UpdateDeploymentRequest(name="sentiment")), "update_mask")
    await expect(
        Code.INVALID_ARGUMENT,
        call(serving_pb2.UpdateDeploymentRequest(name="sentiment", update_mask=mask(paths=["name"]))),
        "cannot be updated",
    )
    await expect(
        Code.NOT_FOUND,
        call(serving_pb2.UpdateDeploymentRequest(name="nope", update_mask=mask(paths=["batching"]))),
        "does not exist",
    )
    await expect(
        Code.INVALID_ARGUMENT, call(serving_pb2.UpdateDeploymentRequest(name="", update_mask=mask(paths=["batching"])))
    )
    await expect(
        Code.INVALID_ARGUMENT,
        call(
            serving_pb2.UpdateDeploymentRequest(
                name="sentiment",
                deployment=serving_pb2.Deployment(
                    prediction_logging=serving_pb2.PredictionLoggingConfig(sample_rate=-0.5)
                ),
                update_mask=mask(paths=["prediction_logging"]),
            )
        ),
        "sample_rate",
    )
    await expect(
        Code.NOT_FOUND,
        call(
            serving_pb2.UpdateDeploymentRequest(
                name="sentiment",
                deployment=serving_pb2.Deployment(target=common_pb2.ModelVersionSelector(alias="staging")),
                update_mask=mask(paths=["target"]),
            )
        ),
        "no alias",
    )
    # Nothing changed.
    got = await api.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="sentiment"))
    assert got.target.alias == "production" and got.prediction_logging.sample_rate == 0


async def test_get_list_delete(api: Api) -> None:
    await expect(Code.NOT_FOUND, api.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="nope")))
    await expect(Code.INVALID_ARGUMENT, api.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="../x")))
    for name in ("b", "a", "c"):
        await create(api, name)
    first = await api.serving.ListDeployments(
        serving_pb2.ListDeploymentsRequest(page=common_pb2.PageRequest(page_size=2))
    )
    assert [d.name for d in first.deployments] == ["a", "b"] and first.next_page_token
    second = await api.serving.ListDeployments(
        serving_pb2.ListDeploymentsRequest(page=common_pb2.PageRequest(page_size=2, page_token=first.next_page_token))
    )
    assert [d.name for d in second.deployments] == ["c"] and not second.next_page_token
    await expect(
        Code.INVALID_ARGUMENT,
        api.serving.ListDeployments(serving_pb2.ListDeploymentsRequest(page=common_pb2.PageRequest(page_token="%%"))),
        "page_token",
    )
    await expect(
        Code.INVALID_ARGUMENT,
        api.serving.ListDeployments(serving_pb2.ListDeploymentsRequest(page=common_pb2.PageRequest(page_size=-1))),
    )
    await api.serving.DeleteDeployment(serving_pb2.DeleteDeploymentRequest(name="a"))
    await expect(Code.NOT_FOUND, api.serving.DeleteDeployment(serving_pb2.DeleteDeploymentRequest(name="a")))
    await expect(Code.NOT_FOUND, api.serving.Predict(serving_pb2.PredictRequest(model="a", texts=["good"])))


# -- typed Predict ----------------------------------------------------------------------------------------------


async def test_predict_answers_with_labels_probabilities_and_version(api: Api) -> None:
    await create(api)
    response = await api.serving.Predict(
        serving_pb2.PredictRequest(model="sentiment", texts=["good", "meh"], request_id="abc")
    )
    assert (response.registered_model_name, response.model_version, response.request_id) == ("sentiment", 1, "abc")
    good, meh = response.predictions
    assert (good.label, list(good.labels), good.uncertain) == ("positive", ["positive"], False)
    assert dict(good.probabilities) == {"negative": pytest.approx(0.1), "positive": pytest.approx(0.9)}
    assert good.top_probability == pytest.approx(0.9)
    assert meh.uncertain


async def test_predict_answers_bad_input_and_unavailable_models(api: Api) -> None:
    await expect(Code.INVALID_ARGUMENT, api.serving.Predict(serving_pb2.PredictRequest(texts=["x"])), "model is")
    await expect(
        Code.NOT_FOUND, api.serving.Predict(serving_pb2.PredictRequest(model="nope", texts=["x"])), "does not exist"
    )
    hold = threading.Event()
    api.source.versions[("sentiment", 1)].hold = hold
    await api.serving.CreateDeployment(
        serving_pb2.CreateDeploymentRequest(deployment=serving_pb2.Deployment(registered_model_name="sentiment"))
    )
    await expect(
        Code.UNAVAILABLE, api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["x"])), "no ready"
    )
    await expect(Code.UNAVAILABLE, api.oip.ModelInfer(infer_request(["x"])), "no ready")
    ready = await api.oip.ModelReady(oip.ModelReadyRequest(name="sentiment"))
    assert not ready.ready
    assert not (await api.oip.ServerReady(oip.ServerReadyRequest())).ready
    hold.set()
    await wait_for(lambda: api.loader.loaded != [])
    for texts, message in (([], "no texts"), (["ok", ""], "text 1 is empty")):
        await expect(
            Code.INVALID_ARGUMENT,
            api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=texts)),
            message,
        )
    await expect(
        Code.NOT_FOUND,
        api.serving.Predict(
            serving_pb2.PredictRequest(
                model="sentiment", texts=["x"], target=common_pb2.ModelVersionSelector(version=2)
            )
        ),
        "not loaded",
    )


async def test_predict_explains_each_text_when_asked_and_only_then(api: Api) -> None:
    await create(api)
    texts = ["good food, awful staff", "bad"]
    plain = await api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=texts))
    assert all(not p.attributions and not p.explained_label for p in plain.predictions)
    assert api.loader.of_version(1).explained == []

    response = await api.serving.Predict(
        serving_pb2.PredictRequest(model="sentiment", texts=texts, explain=True, explain_steps=8)
    )
    mixed, bad = response.predictions
    assert (mixed.label, mixed.explained_label, bad.explained_label) == ("positive", "positive", "negative")
    assert [(a.token, a.start, a.end) for a in mixed.attributions] == [
        ("good", 0, 4),
        ("food,", 5, 10),
        ("awful", 11, 16),
        ("staff", 17, 22),
    ]
    assert [a.score for a in mixed.attributions] == pytest.approx([0.4, 0.0, -0.4, 0.0])
    assert texts[0][mixed.attributions[2].start : mixed.attributions[2].end] == "awful"
    assert [a.score for a in bad.attributions] == pytest.approx([0.4])
    # The label each text is explained for is its most probable one; the steps reach the model as asked.
    assert api.loader.of_version(1).explained == [(texts, [1, 0], 8)]

    await api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["good"], explain=True))
    assert api.loader.of_version(1).explained[-1][2] == 32  # 0 means the default


async def test_predict_refuses_explanations_it_cannot_give_and_explains_nothing(api: Api) -> None:
    await create(api)
    for request, message in (
        (serving_pb2.PredictRequest(model="sentiment", texts=["good"] * 17, explain=True), "at most 16 texts"),
        (serving_pb2.PredictRequest(model="sentiment", texts=["good"], explain=True, explain_steps=257), "between 0"),
        (serving_pb2.PredictRequest(model="sentiment", texts=["good"], explain=True, explain_steps=-1), "between 0"),
        (serving_pb2.PredictRequest(model="sentiment", texts=["good"], explain_steps=8), "explain is not"),
    ):
        await expect(Code.INVALID_ARGUMENT, api.serving.Predict(request), message)
    await create(api, "int8", quantization=serving_pb2.QUANTIZATION_DYNAMIC_INT8)
    details = await expect(
        Code.FAILED_PRECONDITION,
        api.serving.Predict(serving_pb2.PredictRequest(model="int8", texts=["good"], explain=True)),
        "dynamic int8",
    )
    assert "NONE or BF16" in details
    assert all(model.explained == [] and model.batches == [] for model in api.loader.loaded), "nothing was run"
    # The same deployment still answers without explain.
    answer = await api.serving.Predict(serving_pb2.PredictRequest(model="int8", texts=["good"]))
    assert answer.predictions[0].label == "positive"


async def test_an_ensemble_averages_its_versions_one_batch_each_and_a_pin_asks_one(api: Api) -> None:
    api.source.add("sentiment", 3)
    created = await create(api, target=common_pb2.ModelVersionSelector(version=1), ensemble_versions=[2, 3])
    assert list(created.ensemble_versions) == [2, 3]
    api.loader.of_version(2).shift = 0.3  # good: [0.4, 0.6]
    api.loader.of_version(3).shift = 0.6  # good: [0.7, 0.3]; version 1 answers [0.1, 0.9]
    response = await api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["good", "bad"]))
    good, bad = response.predictions
    assert dict(good.probabilities) == {"negative": pytest.approx(0.4), "positive": pytest.approx(0.6)}
    assert dict(bad.probabilities) == {"negative": pytest.approx(1.2), "positive": pytest.approx(-0.2)}
    assert (good.label, response.model_version) == ("positive", 1)  # the target's version names the answer
    assert all(len(api.loader.of_version(v).batches) == 1 for v in (1, 2, 3))  # one batch per member
    # The Open Inference Protocol gets the same average.
    infer = await api.oip.ModelInfer(infer_request(["good"]))
    probabilities = np.frombuffer(infer.raw_output_contents[0], dtype=np.float32)
    assert probabilities.tolist() == pytest.approx([0.4, 0.6])
    # One model of the ensemble, alone.
    pinned = await api.serving.Predict(
        serving_pb2.PredictRequest(model="sentiment", texts=["good"], target=common_pb2.ModelVersionSelector(version=3))
    )
    assert (pinned.model_version, pinned.predictions[0].label) == (3, "negative")
    shown = await api.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="sentiment"))
    weights = {v.version: v.traffic_weight for v in shown.status.versions}
    assert weights == {1: 1.0, 2: 1.0, 3: 1.0} and shown.status.state == serving_pb2.DEPLOYMENT_STATE_READY
    # Explanations are of one model: an ensemble's are refused until the request names a version.
    await expect(
        Code.FAILED_PRECONDITION,
        api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["good"], explain=True)),
        "pin the request",
    )

    # Dropping a member frees it; the rest average.
    update = serving_pb2.UpdateDeploymentRequest(
        name="sentiment",
        deployment=serving_pb2.Deployment(ensemble_versions=[3]),
        update_mask=field_mask_pb2.FieldMask(paths=["ensemble_versions"]),
    )
    updated = await api.serving.UpdateDeployment(update)
    assert list(updated.ensemble_versions) == [3]
    await wait_for(lambda: api.loader.of_version(2).closed)
    response = await api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["good"]))
    assert response.predictions[0].probabilities["positive"] == pytest.approx(0.6)  # (0.9 + 0.3) / 2


async def test_ensembles_refuse_what_they_cannot_average(api: Api) -> None:
    one = common_pb2.ModelVersionSelector(version=1)
    for fields, message in (
        ({"ensemble_versions": [2, 2]}, "distinct"),
        ({"ensemble_versions": [1, 2], "target": one}, "the target itself"),
        ({"ensemble_versions": list(range(2, 10))}, "at most 7"),
        (
            {"ensemble_versions": [2], "canary": serving_pb2.CanaryRoute(target=one, weight=0.5)},
            "either an ensemble or split by a canary",
        ),
    ):
        await expect(
            Code.INVALID_ARGUMENT,
            api.serving.CreateDeployment(
                serving_pb2.CreateDeploymentRequest(
                    deployment=serving_pb2.Deployment(name="bad", registered_model_name="sentiment", **fields)  # type: ignore[arg-type]
                )
            ),
            message,
        )
    # A member that does not exist: the deployment waits for it, requests are UNAVAILABLE naming it.
    await create(api, "missing", target=one, ensemble_versions=[2, 9])
    await expect(
        Code.UNAVAILABLE,
        api.serving.Predict(serving_pb2.PredictRequest(model="missing", texts=["good"])),
        "version(s) [9] are not loaded",
    )
    shown = await api.serving.GetDeployment(serving_pb2.GetDeploymentRequest(name="missing"))
    assert shown.status.state == serving_pb2.DEPLOYMENT_STATE_DEGRADED and "9" in shown.status.message
    assert not (await api.oip.ServerReady(oip.ServerReadyRequest())).ready
    # Members with other labels cannot be averaged with the target.
    api.source.add("sentiment", 4, label_map=("bad", "good"))
    await create(api, "mixed", target=one, ensemble_versions=[4])
    await expect(
        Code.FAILED_PRECONDITION,
        api.serving.Predict(serving_pb2.PredictRequest(model="mixed", texts=["good"])),
        "the same labels",
    )
    assert all(not model.batches for model in api.loader.loaded), "nothing was run"


async def test_a_full_queue_answers_resource_exhausted_and_a_deadline_drops_the_request(api: Api) -> None:
    await create(api, batching=serving_pb2.BatchingConfig(max_batch_size=1, max_delay_ms=0, max_queue_size=2))
    model = api.loader.of_version(1)
    model.gate = threading.Event()
    running = asyncio.ensure_future(api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["a"])))
    await wait_for(lambda: len(model.batches) == 1)
    queued = asyncio.ensure_future(api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["b"])))
    await asyncio.sleep(0.1)
    await expect(
        Code.RESOURCE_EXHAUSTED,
        api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["c", "d"])),
        "queue is full",
    )
    # The caller's deadline passes while it waits: DEADLINE_EXCEEDED, and its text never reaches the model.
    await expect(
        Code.DEADLINE_EXCEEDED,
        api.serving.Predict(serving_pb2.PredictRequest(model="sentiment", texts=["late"]), timeout=0.3),
    )
    model.gate.set()
    await running
    await queued
    await asyncio.sleep(0.1)
    seen = [len(item.ids) for batch in model.batches for item in batch]
    assert len(seen) == 2, "only the two admitted requests ran"


# -- Open Inference Protocol ------------------------------------------------------------------------------------


async def test_oip_server_and_model_metadata(api: Api) -> None:
    assert (await api.oip.ServerLive(oip.ServerLiveRequest())).live
    assert (await api.oip.ServerReady(oip.ServerReadyRequest())).ready
    server = await api.oip.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "gristmill-serving" and server.version
    await expect(Code.NOT_FOUND, api.oip.ModelReady(oip.ModelReadyRequest(name="nope")))
    await expect(Code.NOT_FOUND, api.oip.ModelMetadata(oip.ModelMetadataRequest(name="nope")))
    await create(api)
    assert (await api.oip.ModelReady(oip.ModelReadyRequest(name="sentiment"))).ready
    assert (await api.oip.ModelReady(oip.ModelReadyRequest(name="sentiment", version="1"))).ready
    assert not (await api.oip.ModelReady(oip.ModelReadyRequest(name="sentiment", version="2"))).ready
    assert not (await api.oip.ModelReady(oip.ModelReadyRequest(name="sentiment", version="x"))).ready
    metadata = await api.oip.ModelMetadata(oip.ModelMetadataRequest(name="sentiment"))
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, 2]),
        ("label", "BYTES", [-1]),
        ("label_index", "INT64", [-1]),
    ]
    await expect(Code.NOT_FOUND, api.oip.ModelMetadata(oip.ModelMetadataRequest(name="sentiment", version="2")))
    await expect(Code.INVALID_ARGUMENT, api.oip.ModelMetadata(oip.ModelMetadataRequest(name="sentiment", version="v")))


async def test_model_infer_returns_raw_outputs(api: Api) -> None:
    await create(api)
    request = infer_request(["good food", "bad", "meh"], shape=[3, 1])
    # Triton's extra parameter kinds are accepted (and ignored).
    request.parameters["priority"].uint64_param = 1
    request.parameters["timeout_scale"].double_param = 1.5
    response = await api.oip.ModelInfer(request)
    assert (response.model_name, response.model_version, response.id) == ("sentiment", "1", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "FP32", [3, 2]),
        ("label", "BYTES", [3]),
        ("label_index", "INT64", [3]),
    ]
    assert len(response.raw_output_contents) == 3 and not any(o.HasField("contents") for o in response.outputs)
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 2)
    assert probabilities[:, 1] == pytest.approx([0.9, 0.1, 0.55])
    assert response.raw_output_contents[1] == bytes_tensor([b"positive", b"negative", b"positive"])
    assert np.frombuffer(response.raw_output_contents[2], dtype="<i8").tolist() == [1, 0, 1]
    # A subset of outputs, in the order asked; typed bytes_contents as input.
    typed = oip.ModelInferRequest(
        model_name="sentiment",
        model_version="1",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="text", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[b"good"])
            )
        ],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="label_index")],
    )
    subset = await api.oip.ModelInfer(typed)
    assert [o.name for o in subset.outputs] == ["label_index"]
    assert np.frombuffer(subset.raw_output_contents[0], dtype="<i8").tolist() == [1]


async def test_model_infer_answers_bad_tensors_with_invalid_argument(api: Api) -> None:
    await create(api)
    tensor = oip.ModelInferRequest.InferInputTensor
    good = bytes_tensor([b"good", b"bad"])

    def request(**kwargs: object) -> oip.ModelInferRequest:
        fields: dict[str, object] = {
            "model_name": "sentiment",
            "inputs": [tensor(name="text", datatype="BYTES", shape=[2])],
            "raw_input_contents": [good],
        }
        fields.update(kwargs)
        return oip.ModelInferRequest(**fields)  # type: ignore[arg-type]

    cases = [
        (request(inputs=[tensor(name="input_ids", datatype="BYTES", shape=[2])]), "unknown input tensor 'input_ids'"),
        (request(inputs=[tensor(name="text", datatype="FP32", shape=[2])]), "must be BYTES"),
        (request(inputs=[tensor(name="text", datatype="BYTES", shape=[2, 3])]), "use [batch] or [batch, 1]"),
        (request(inputs=[tensor(name="text", datatype="BYTES", shape=[0])], raw_input_contents=[b""]), "empty"),
        (request(inputs=[]), "exactly one input tensor"),
        (
            request(inputs=[tensor(name="text", datatype="BYTES", shape=[2])] * 2, raw_input_contents=[good, good]),
            "exactly one input tensor",
        ),
        (request(raw_input_contents=[good[:-5]]), "element 1 is cut off in its 4-byte"),
        (request(raw_input_contents=[good[:-1]]), "declares 3 bytes but only 2 remain"),
        (request(raw_input_contents=[good + b"\x00"]), "bytes left after the 2 elements"),
        (request(raw_input_contents=[bytes_tensor([b"good"])]), "holds 1 BYTES elements but its shape declares 2"),
        (request(raw_input_contents=[bytes_tensor([b"\xff\xfe", b"ok"])]), "not valid UTF-8"),
        (request(raw_input_contents=[bytes_tensor([b"", b"ok"])]), "text 0 is empty"),
        (request(raw_input_contents=[good, good]), "2 entries for 1 input"),
        (
            request(
                inputs=[
                    tensor(
                        name="text",
                        datatype="BYTES",
                        shape=[2],
                        contents=oip.InferTensorContents(bytes_contents=[b"a"]),
                    )
                ]
            ),
            "mixed",
        ),
        (
            request(
                inputs=[
                    tensor(
                        name="text",
                        datatype="BYTES",
                        shape=[2],
                        contents=oip.InferTensorContents(bytes_contents=[b"a"]),
                    )
                ],
                raw_input_contents=[],
            ),
            "holds 1 texts",
        ),
        (request(outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="logits")]), "unknown output"),
        (request(model_version="latest"), "not a version number"),
        (request(model_name=""), "model_name is required"),
        (
            request(inputs=[tensor(name="text", datatype="BYTES", shape=[2000])], raw_input_contents=[b""]),
            "limit is 1024",
        ),
    ]
    for bad, message in cases:
        await expect(Code.INVALID_ARGUMENT, api.oip.ModelInfer(bad), message)
    await expect(Code.NOT_FOUND, api.oip.ModelInfer(request(model_name="nope")), "does not exist")
    await expect(Code.NOT_FOUND, api.oip.ModelInfer(request(model_version="9")), "not loaded")
    assert api.loader.of_version(1).batches == [], "no bad request reached the model"


async def test_an_oversized_message_is_refused_by_grpc_limits(api: Api) -> None:
    await create(api)
    text = b"x" * (5 * 1024 * 1024)
    await expect(Code.RESOURCE_EXHAUSTED, api.oip.ModelInfer(infer_request([text.decode()])))
    assert api.loader.of_version(1).batches == []


async def test_reflection_describes_both_apis(api: Api) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "inference.GRPCInferenceService" in names and "gristmill.api.serving.v1.ServingService" in names
    files = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")])
    )
    found = [r async for r in files]
    assert found[0].file_descriptor_response.file_descriptor_proto, "the private-pool OIP file is described"
