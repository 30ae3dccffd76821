"""Triton's decoupled streaming on the real stack: a tiny Llama chat version from the real registry and S3, served
by a deployment, answers the real ``tritonclient.grpc`` client, unchanged (``start_stream`` /
``async_stream_infer``): two requests in flight on one stream, each in several responses carrying its id, greedy
replies equal to transformers' ``generate``, the last response flagged final with the finish reason and the usage;
a bad request gets its error in the callback while the other requests on the stream complete; a reply in one
response with Triton's empty final response; a client that cancels its stream frees the sequences.
(Fixtures: ``test_serving_stack``; the chat model's registration and reference replies: ``test_generation_stack``.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.registry.v1 import registry_pb2
from gristmill.api.serving.v1 import serving_pb2
from services.serving.tests.integration.test_generation_stack import TEXTS, reference_reply, register_chat
from services.serving.tests.integration.test_serving_stack import Stack, bytes_tensor
from tests.support.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration

MAX_TOKENS = 24


@dataclass
class Received:
    """What the stream's callback saw: each request's results by id, and the errors (which carry no result)."""

    results: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    order: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def callback(self, result: Any, error: Any) -> None:
        with self.changed:
            if error is not None:
                self.errors.append(str(error))
            else:
                response = result.get_response()
                self.results[response.id].append(result)
                self.order.append(response.id)
                if response.parameters["triton_final_response"].bool_param:
                    self.finished.add(response.id)
            self.changed.notify_all()

    def wait(self, finished: set[str], errors: int, timeout_s: float = 120) -> None:
        with self.changed:
            done = self.changed.wait_for(
                lambda: finished <= self.finished and len(self.errors) >= errors, timeout=timeout_s
            )
        assert done, f"finished {self.finished} of {finished}, errors {self.errors}"


def inputs(**tensors: object) -> list[Any]:
    """tritonclient inputs of shape [1]: a str is BYTES, a bool is BOOL, a dict is BYTES holding its JSON."""
    import tritonclient.grpc as triton

    out = []
    for name, value in tensors.items():
        if isinstance(value, bool):
            tensor = triton.InferInput(name, [1], "BOOL")
            tensor.set_data_from_numpy(np.array([value], dtype=bool))
        else:
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            tensor = triton.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode("utf-8")], dtype=np.object_))
        out.append(tensor)
    return out


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def triton_stream(port: int, model: str) -> Received:
    """One stream of the real tritonclient, unchanged, against our server (blocking: run it on a thread)."""
    import tritonclient.grpc as triton

    received = Received()
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    greedy = {"temperature": 0, "max_tokens": MAX_TOKENS}
    try:
        client.start_stream(callback=received.callback)
        # Two replies in flight at once, streamed, then requests that are refused: each its own error.
        for request_id, text in (("first", TEXTS[0]), ("second", TEXTS[1])):
            client.async_stream_infer(
                model,
                inputs(messages=chat_messages(text), stream=True, sampling_parameters=greedy),
                request_id=request_id,
                outputs=[triton.InferRequestedOutput("text_output")],
            )
        client.async_stream_infer(
            model,
            inputs(messages=chat_messages(TEXTS[2]), stream=True, sampling_parameters={"temperature": -1}),
            request_id="bad-temperature",
        )
        client.async_stream_infer(model, inputs(text=TEXTS[2]), request_id="unknown-input")
        # The whole reply in one response, sampling as request parameters, Triton's empty final response.
        client.async_stream_infer(
            model,
            inputs(messages=chat_messages(TEXTS[2])),
            request_id="whole",
            parameters={"temperature": 0.0, "max_tokens": MAX_TOKENS},
            enable_empty_final_response=True,
        )
        # A raw prompt, no chat template.
        client.async_stream_infer(
            model,
            inputs(text_input=TEXTS[0], stream=True, exclude_input_in_output=True),
            request_id="raw",
            parameters={"max_tokens": 8, "seed": 3},
        )
        received.wait({"first", "second", "whole", "raw"}, errors=2)
    finally:
        client.stop_stream()
        client.close()
    return received


def cancel_mid_stream(port: int, model: str) -> None:
    """Start a long reply, read its first response, then cancel the stream (as a client that goes away)."""
    import tritonclient.grpc as triton

    received = Received()
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        client.start_stream(callback=received.callback)
        client.async_stream_infer(
            model,
            inputs(messages=chat_messages(TEXTS[0]), stream=True),
            request_id="long",
            parameters={"max_tokens": 400, "temperature": 1.0},
        )
        with received.changed:
            assert received.changed.wait_for(lambda: received.results["long"], timeout=60)
        client.stop_stream(cancel_requests=True)
    finally:
        client.close()


def text_of(results: list[Any]) -> str:
    return "".join(
        output.decode("utf-8")
        for result in results
        if (array := result.as_numpy("text_output")) is not None
        for output in array
    )


def final_parameters(result: Any) -> dict[str, Any]:
    parameters = result.get_response().parameters
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in parameters.items()}


async def test_model_stream_infer_serves_tritonclient_streams(stack: Stack, tmp_path: Path) -> None:
    objects = stack.serving_host.platform.objects
    model_dir = make_tiny_llama(tmp_path / "v1", TEXTS * 4, initializer_range=0.2, seed=1)
    version = await register_chat(stack, objects, model_dir, f"{stack.model}-sft-1")
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=version), timeout=30
    )
    await stack.serving.CreateDeployment(
        serving_pb2.CreateDeploymentRequest(
            deployment=serving_pb2.Deployment(name=stack.model, registered_model_name=stack.model),
            wait_until_ready=True,
        ),
        timeout=120,
    )

    received = await asyncio.to_thread(triton_stream, stack.serving_port, stack.model)

    # Streamed, greedy: transformers' reply, in several responses, each with its request's id and the version.
    for request_id, text in (("first", TEXTS[0]), ("second", TEXTS[1])):
        results = received.results[request_id]
        assert len(results) > 1
        assert text_of(results) == reference_reply(model_dir, text, MAX_TOKENS)
        assert {(r.get_response().id, r.get_response().model_version) for r in results} == {(request_id, str(version))}
        flags = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
        assert flags == [False] * (len(results) - 1) + [True]
        last = final_parameters(results[-1])
        assert last["finish_reason"] in ("stop", "length") and last["prompt_tokens"] > 0
        assert 0 < last["completion_tokens"] <= MAX_TOKENS
        assert last["finish_reason"] == "stop" or last["completion_tokens"] == MAX_TOKENS
        assert last["request_id"]
    # Both were in flight together: the second's first chunk came before the first's last.
    assert received.order.index("second") < len(received.order) - received.order[::-1].index("first") - 1

    # Each refused request got its error; the others on the stream completed all the same.
    assert len(received.errors) == 2
    assert any("[StatusCode.INVALID_ARGUMENT] temperature must be between 0" in e for e in received.errors)
    assert any("unknown input tensor 'text'" in e for e in received.errors)

    # The whole reply in one response, then Triton's empty final response with the finish reason and usage.
    data, final = received.results["whole"]
    assert text_of([data]) == reference_reply(model_dir, TEXTS[2], MAX_TOKENS)
    assert data.get_response().parameters["triton_final_response"].bool_param is False
    assert final.as_numpy("text_output") is None and final.get_response().id == "whole"
    assert final_parameters(final)["triton_final_response"] is True
    assert final_parameters(final)["completion_tokens"] > 0

    raw = received.results["raw"]
    assert final_parameters(raw[-1])["finish_reason"] in ("stop", "length")
    assert final_parameters(raw[-1])["completion_tokens"] <= 8

    # Unary ModelInfer stays for classifiers.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.oip.ModelInfer(
            oip.ModelInferRequest(
                model_name=stack.model,
                inputs=[oip.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])],
                raw_input_contents=[bytes_tensor([b"hello"])],
            ),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "generative model" in (caught.value.details() or "")

    # A client that cancels its stream mid-reply frees the sequence and its cache.
    generator = stack.serving_app.service.manager.loaded_versions("default", stack.model)[0].generator
    assert generator is not None
    await asyncio.to_thread(cancel_mid_stream, stack.serving_port, stack.model)
    deadline = time.monotonic() + 10
    while generator.stats().running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stats = generator.stats()
    assert (stats.running, stats.queued, stats.cached_tokens, stats.reserved_tokens) == (0, 0, 0, 0)
