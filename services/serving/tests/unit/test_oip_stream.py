"""Triton's decoupled streaming (``ModelStreamInfer``) without a model: the tensors and parameters of Triton's vLLM
backend parsed into a generation request (and each kind of bad input refused with a message naming it), the
responses a reply ends with, and the servicer over a real port on the fake platform: per-request errors answered
on the stream (which goes on), and the shared API-key suite on the streaming method."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import pytest

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from gristmill.core.auth import REGISTRY_READ, SERVING_PREDICT
from gristmill.core.chat import ChatMessage
from gristmill.core.errors import InvalidArgumentError
from gristmill.serving.api.convert import decode_bytes_elements, encode_bytes_elements
from gristmill.serving.api.oip_stream import StreamRequest, error_response, final_responses, parse_stream_request
from gristmill.serving.domain.generation import (
    FinishReason,
    Generation,
    GenerationChunk,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    Usage,
)
from services.serving.tests.support import build_fake_host
from services.serving.tests.unit.test_auth import Server, server  # noqa: F401
from tests.contracts.auth import AuthContract, AuthSubject, Metadata, key_subject

Input = tuple[str, str, bytes]


def text(name: str, value: str) -> Input:
    """A BYTES [1] input as tritonclient sends it: raw, 4-byte little-endian length first."""
    return name, "BYTES", encode_bytes_elements([value.encode("utf-8")])


def flag(name: str, value: bool) -> Input:
    """A BOOL [1] input as tritonclient sends it: one raw byte."""
    return name, "BOOL", bytes([value])


def request(*inputs: Input, parameters: Mapping[str, object] | None = None, **fields: object) -> oip.ModelInferRequest:
    message = oip.ModelInferRequest(**{"model_name": "assistant", **fields})  # type: ignore[arg-type]
    for name, datatype, raw in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=[1])
        message.raw_input_contents.append(raw)
    for name, value in (parameters or {}).items():
        parameter = message.parameters[name]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = str(value)
    return message


def test_vllm_style_request_with_string_numbers() -> None:
    # What Triton's vLLM sample client sends: sampling values as strings, in the tensor and as parameters.
    sampling = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "100", "stop": ["\n\n"]}
    parsed = parse_stream_request(
        request(
            text("text_input", "Once upon a time"),
            flag("stream", True),
            text("sampling_parameters", json.dumps(sampling)),
            parameters={"temperature": "0.1", "top_p": "0.95", "max_tokens": "100"},
            id="7",
        )
    )
    assert parsed == StreamRequest(
        prompt="Once upon a time",
        stream=True,
        sampling=SamplingParams(temperature=0.1, top_p=0.95, top_k=0, seed=None),
        max_new_tokens=100,
        stop=("\n\n",),
    )


def test_messages_typed_contents_parameters_and_reserved_names() -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    message = request(
        parameters={
            "temperature": 0.0,
            "top_k": -1,
            "seed": 5,
            "stop": "END",
            "max_tokens": 7,
            "triton_enable_empty_final_response": True,
            "timeout": 2_500_000,
            "priority": 3,
            "triton_future_flag": 1,
        }
    )
    # Typed contents and Triton's batched shape [1, 1] are accepted too.
    tensor = message.inputs.add(name="messages", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(json.dumps(conversation).encode())
    message.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(False)
    message.outputs.add(name="text_output")
    parsed = parse_stream_request(message)
    assert parsed.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert parsed.prompt == "" and parsed.stream is False
    assert parsed.sampling == SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=5)
    assert (parsed.max_new_tokens, parsed.stop) == (7, ("END",))
    assert parsed.empty_final is True and parsed.timeout_s == pytest.approx(2.5)


def test_the_tensor_wins_over_a_parameter_and_defaults_fill_the_rest() -> None:
    parsed = parse_stream_request(
        request(
            text("text_input", "hi"),
            text("sampling_parameters", json.dumps({"temperature": 0.5, "seed": None})),
            parameters={"temperature": 1.5, "top_k": 40},
        )
    )
    assert parsed.sampling == SamplingParams(temperature=0.5, top_p=1.0, top_k=40, seed=None)
    assert parsed.stream is False and parsed.max_new_tokens is None and parsed.empty_final is False


def _raw_count_mismatch() -> oip.ModelInferRequest:
    message = request(text("text_input", "hi"))
    message.raw_input_contents.append(b"")
    return message


def _mixed_contents() -> oip.ModelInferRequest:
    message = request(text("text_input", "hi"))
    message.inputs[0].contents.bytes_contents.append(b"hi")
    return message


def _wrong_shape() -> oip.ModelInferRequest:
    message = request(text("text_input", "hi"))
    message.inputs[0].shape[:] = [2]
    return message


def _unknown_output() -> oip.ModelInferRequest:
    message = request(text("text_input", "hi"))
    message.outputs.add(name="finish_reason")
    return message


def _typed_bool_count() -> oip.ModelInferRequest:
    message = oip.ModelInferRequest(model_name="assistant")
    message.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    message.inputs.add(name="stream", datatype="BOOL", shape=[1])
    return message


BAD = [
    (request(text("prompt", "hi")), "unknown input tensor 'prompt'"),
    (request(), "exactly one of the inputs 'text_input'"),
    (request(text("text_input", "a"), text("messages", "[]")), "exactly one of the inputs"),
    (request(text("text_input", "")), "'text_input' is empty"),
    (request(text("text_input", "a"), text("text_input", "b")), "sent twice"),
    (request(("text_input", "FP32", b"\0\0\0\0")), "must be BYTES"),
    (request(("text_input", "BYTES", b"\x09\0\0\0hi")), "malformed BYTES framing"),
    (request(("text_input", "BYTES", encode_bytes_elements([b"\xff"]))), "not valid UTF-8"),
    (_raw_count_mismatch(), "raw_input_contents has 2 entries for 1 input"),
    (_mixed_contents(), "are mixed"),
    (_wrong_shape(), "has shape [2]"),
    (_unknown_output(), "unknown output tensor 'finish_reason'"),
    (_typed_bool_count(), "holds 0 elements in contents.bool_contents"),
    (request(text("text_input", "hi"), ("stream", "BOOL", b"\x01\x00")), "one byte, 0 or 1"),
    (request(text("text_input", "hi"), ("stream", "BYTES", b"")), "must be BOOL"),
    (request(text("messages", "{not json")), "'messages' is not valid JSON"),
    (request(text("messages", '{"role": "user"}')), "must be a JSON array"),
    (request(text("messages", "[]")), "'messages' is an empty array"),
    (request(text("messages", '[{"role": "robot", "content": "x"}]')), "message 1, field 'role': unknown role"),
    (request(text("text_input", "hi"), flag("exclude_input_in_output", False)), "never echoed"),
    (request(text("text_input", "hi"), text("sampling_parameters", "[1]")), "must be a JSON object"),
    (request(text("text_input", "hi"), text("sampling_parameters", "{")), "'sampling_parameters' is not valid JSON"),
    (
        request(text("text_input", "hi"), text("sampling_parameters", '{"n": 2, "best_of": 3}')),
        "unknown key(s) 'best_of', 'n'",
    ),
    (
        request(text("text_input", "hi"), text("sampling_parameters", '{"temperature": "warm"}')),
        "sampling_parameters.temperature must be a number, got 'warm'",
    ),
    (
        request(text("text_input", "hi"), text("sampling_parameters", '{"max_tokens": true}')),
        "sampling_parameters.max_tokens must be an integer, got True",
    ),
    (
        request(text("text_input", "hi"), text("sampling_parameters", '{"top_k": 2.5}')),
        "top_k must be an integer, got 2.5",
    ),
    (
        request(text("text_input", "hi"), text("sampling_parameters", '{"stop": [1]}')),
        "stop must be a string or a list of strings",
    ),
    (request(text("text_input", "hi"), parameters={"lora_name": "x"}), "unknown request parameter 'lora_name'"),
    (request(text("text_input", "hi"), parameters={"sequence_id": 4}), "sequences are not supported"),
    (
        request(text("text_input", "hi"), parameters={"triton_enable_empty_final_response": 1}),
        "must be a bool_param",
    ),
    (request(text("text_input", "hi"), parameters={"timeout": -1}), "must be 0 (none) or more"),
]


@pytest.mark.parametrize(("message", "words"), BAD, ids=[words for _, words in BAD])
def test_bad_input_is_refused_with_a_message_naming_it(message: oip.ModelInferRequest, words: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_stream_request(message)
    assert words in caught.value.message


# -- responses -------------------------------------------------------------------------------------------------


async def a_generation() -> Generation:
    stream = GenerationStream(GenerationRequest("rid-1", (1, 2, 3), 8), cancel=lambda request_id: None)
    return Generation(stream, registered_model_name="assistant-model", version=3, on_done=lambda ok: None)


def text_of(response: oip.ModelStreamInferResponse) -> str | None:
    infer = response.infer_response
    if not infer.outputs:
        return None
    assert [(o.name, o.datatype, list(o.shape)) for o in infer.outputs] == [("text_output", "BYTES", [1])]
    return decode_bytes_elements(infer.raw_output_contents[0], 1, tensor="text_output")[0].decode()


def parameters(response: oip.ModelStreamInferResponse) -> dict[str, object]:
    return {
        name: getattr(value, value.WhichOneof("parameter_choice") or "bool_param")
        for name, value in response.infer_response.parameters.items()
    }


async def test_the_last_response_carries_the_final_flag_the_finish_reason_and_the_usage() -> None:
    generation = await a_generation()
    asked = request(text("text_input", "hi"), id="req-9")
    last = GenerationChunk("end.", (7, 8), FinishReason.LENGTH, Usage(3, 5))
    (only,) = final_responses(asked, generation, "end.", last, empty_final=False)
    assert text_of(only) == "end."
    infer = only.infer_response
    assert (infer.id, infer.model_name, infer.model_version) == ("req-9", "assistant", "3")
    assert parameters(only) == {
        "triton_final_response": True,
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "request_id": "rid-1",
    }

    # Asked for Triton's empty final response: the text, then the flag (and the rest) without outputs.
    data, final = final_responses(asked, generation, "end.", last, empty_final=True)
    assert text_of(data) == "end." and parameters(data) == {"triton_final_response": False}
    assert text_of(final) is None and final.infer_response.id == "req-9"
    assert parameters(final)["triton_final_response"] is True and parameters(final)["finish_reason"] == "length"
    # No text left for the last chunk: the final response alone.
    (alone,) = final_responses(asked, generation, "", last, empty_final=True)
    assert text_of(alone) is None and parameters(alone)["completion_tokens"] == 5


def test_an_error_response_names_its_request_and_status() -> None:
    response = error_response(request(id="req-4"), grpc.StatusCode.NOT_FOUND, "deployment 'x' does not exist")
    assert response.error_message == "[StatusCode.NOT_FOUND] deployment 'x' does not exist"
    assert response.infer_response.id == "req-4" and parameters(response) == {"triton_final_response": True}


# -- the servicer, over a real port --------------------------------------------------------------------------


@pytest.fixture
async def oip_stub(tmp_path: Path) -> AsyncIterator[oip_grpc.GRPCInferenceServiceStub]:
    host, _, _ = build_fake_host(tmp_path)
    port = await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await serving_pb2_grpc.ServingServiceStub(channel).CreateDeployment(
            serving_pb2.CreateDeploymentRequest(
                deployment=serving_pb2.Deployment(name="sentiment", registered_model_name="sentiment"),
                wait_until_ready=True,
            ),
            timeout=10,
        )
        yield oip_grpc.GRPCInferenceServiceStub(channel)
    await host.stop()


async def test_each_bad_request_gets_its_error_and_the_stream_goes_on(
    oip_stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    prompt = text("text_input", "hello")
    requests = [
        request(prompt, id="classifier", model_name="sentiment"),
        request(prompt, id="missing", model_name="no-such-deployment"),
        request(text("prompt", "hello"), id="bad-tensor", model_name="sentiment"),
        request(prompt, id="bad-version", model_name="sentiment", model_version="latest"),
        request(prompt, id="no-model", model_name=""),
    ]
    responses = [r async for r in oip_stub.ModelStreamInfer(iter(requests), timeout=10)]
    errors = {r.infer_response.id: r.error_message for r in responses}
    assert len(responses) == len(errors) == len(requests)
    assert errors["classifier"].startswith("[StatusCode.INVALID_ARGUMENT] ")
    assert "serves a classifier" in errors["classifier"] and "CLASSIFICATION" in errors["classifier"].upper()
    assert errors["missing"].startswith("[StatusCode.NOT_FOUND] ") and "no-such-deployment" in errors["missing"]
    assert "unknown input tensor 'prompt'" in errors["bad-tensor"]
    assert "is not a version number" in errors["bad-version"]
    assert "model_name is required" in errors["no-model"]
    assert all(parameters(r)["triton_final_response"] is True for r in responses)

    # A stream without requests ends at once, OK.
    assert [r async for r in oip_stub.ModelStreamInfer(iter([]), timeout=10)] == []


def stream_with_sync_client(address: str, metadata: Metadata) -> list[oip.ModelStreamInferResponse]:
    """One request on a stream, with grpc's blocking client (tritonclient's): grpc's asyncio client may report
    INTERNAL "Internal error from Core" instead of a status the server sends before it reads the request stream
    (grpc/grpc#36066). Its error is raised as the asyncio client's, which the auth suite expects."""
    with grpc.insecure_channel(address) as channel:
        stream = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([request(text("text_input", "hi"), id="1")]), metadata=metadata, timeout=10
        )
        try:
            return list(stream)
        except grpc.RpcError:
            raise grpc.aio.AioRpcError(
                stream.code(), grpc.aio.Metadata(), grpc.aio.Metadata(), stream.details()
            ) from None


class TestStreamInferAuth(AuthContract):
    """Streaming calls go through the same API-key check as unary ones (the scope of /inference.*)."""

    @pytest.fixture
    async def auth_subject(self, server: Server) -> AuthSubject:  # noqa: F811
        address = server[0]

        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await asyncio.to_thread(stream_with_sync_client, address, metadata)

        return key_subject(*server, call, SERVING_PREDICT, REGISTRY_READ)
