"""Triton's decoupled streaming (``ModelStreamInfer``) for generative deployments: the tensors and parameters of
Triton's vLLM / TensorRT-LLM backends → what ``DeploymentService.generate`` takes, and chunks → responses.

Transport only: the ranges (temperature, top_p, max_tokens, stop sequences, the conversation) are the domain's
to check, so every protocol refuses the same values with the same words. See grpc_predict_v2.proto's file
comment for the conventions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.core.chat import ChatMessage, message_from_json
from gristmill.core.errors import InvalidArgumentError
from gristmill.serving.api.convert import decode_bytes_elements, encode_bytes_elements
from gristmill.serving.domain.generation import DEFAULT_SAMPLING, Generation, GenerationChunk, SamplingParams, Usage

TEXT_INPUT = "text_input"
MESSAGES_INPUT = "messages"
STREAM_INPUT = "stream"
SAMPLING_INPUT = "sampling_parameters"
EXCLUDE_INPUT = "exclude_input_in_output"
INPUTS = (TEXT_INPUT, MESSAGES_INPUT, STREAM_INPUT, SAMPLING_INPUT, EXCLUDE_INPUT)
TEXT_OUTPUT = "text_output"

# Sampling values, in the sampling_parameters tensor's JSON or as request parameters (vLLM's names).
TEMPERATURE = "temperature"
TOP_P = "top_p"
TOP_K = "top_k"
SEED = "seed"
MAX_TOKENS = "max_tokens"
STOP = "stop"
MIN_TOKENS = "min_tokens"
SAMPLING_KEYS = (TEMPERATURE, TOP_P, TOP_K, SEED, MAX_TOKENS, STOP, MIN_TOKENS)

# Triton's reserved request parameters.
EMPTY_FINAL = "triton_enable_empty_final_response"
TIMEOUT_US = "timeout"
PRIORITY = "priority"
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
_TRITON_PREFIX = "triton_"

# Response parameters.
FINAL_RESPONSE = "triton_final_response"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
REQUEST_ID = "request_id"


@dataclass(frozen=True)
class StreamRequest:
    """What one request on the stream asks for (its model and version are the servicer's to read)."""

    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    # One response per chunk (True) or one with the whole reply.
    stream: bool = False
    sampling: SamplingParams = DEFAULT_SAMPLING
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    # Triton's triton_enable_empty_final_response: the final flag comes in a response of its own.
    empty_final: bool = False
    # The request's own "timeout" parameter, in seconds (None: the call's deadline only).
    timeout_s: float | None = None


# -- requests -------------------------------------------------------------------------------------------------


def parse_stream_request(request: oip.ModelInferRequest) -> StreamRequest:
    """``request``'s inputs, outputs and parameters; ``InvalidArgumentError`` naming what is wrong."""
    tensors = _input_tensors(request)
    text = _text(tensors, TEXT_INPUT)
    messages_json = _text(tensors, MESSAGES_INPUT)
    if (text is None) == (messages_json is None):
        raise InvalidArgumentError(
            f"send exactly one of the inputs '{TEXT_INPUT}' (BYTES [1], a raw prompt) and '{MESSAGES_INPUT}' "
            "(BYTES [1], a JSON array of chat messages, rendered with the model's chat template)"
        )
    if text is not None and not text:
        raise InvalidArgumentError(f"input '{TEXT_INPUT}' is empty; send the prompt")
    messages = messages_from_json(messages_json) if messages_json is not None else ()
    if _flag(tensors, EXCLUDE_INPUT) is False:
        raise InvalidArgumentError(
            f"input '{EXCLUDE_INPUT}' is false, but the prompt is never echoed: send true or leave it out"
        )
    _check_outputs(request)

    values, reserved = _request_parameters(request.parameters)
    sampling_json = _text(tensors, SAMPLING_INPUT)
    if sampling_json is not None:
        # The tensor's values win over request parameters of the same name.
        values |= _sampling_object(sampling_json)
    temperature = _float(values, TEMPERATURE)
    top_p = _float(values, TOP_P)
    top_k = _int(values, TOP_K)
    return StreamRequest(
        messages=messages,
        prompt=text or "",
        stream=bool(_flag(tensors, STREAM_INPUT)),
        sampling=SamplingParams(
            temperature=DEFAULT_SAMPLING.temperature if temperature is None else temperature,
            top_p=DEFAULT_SAMPLING.top_p if top_p is None else top_p,
            # vLLM's -1 and ours 0 both mean no top-k filtering.
            top_k=0 if top_k in (None, -1) else top_k,
            seed=_int(values, SEED),
            min_tokens=_int(values, MIN_TOKENS) or 0,
        ),
        max_new_tokens=_int(values, MAX_TOKENS),
        stop=_stop(values),
        empty_final=reserved.empty_final,
        timeout_s=reserved.timeout_s,
    )


def messages_from_json(text: str) -> tuple[ChatMessage, ...]:
    """The ``messages`` input: a JSON array of OpenAI-shaped messages."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"input '{MESSAGES_INPUT}' is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise InvalidArgumentError(
            f"input '{MESSAGES_INPUT}' must be a JSON array of messages such as "
            '[{"role": "user", "content": "Hello"}]'
        )
    if not value:
        raise InvalidArgumentError(f"input '{MESSAGES_INPUT}' is an empty array; send the conversation")
    return tuple(message_from_json(m, f"input '{MESSAGES_INPUT}', message {i + 1}") for i, m in enumerate(value))


_Tensor = tuple[oip.ModelInferRequest.InferInputTensor, bytes | None]


def _input_tensors(request: oip.ModelInferRequest) -> dict[str, _Tensor]:
    """Each input by name with its raw contents (None when sent in typed contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input tensors; send one per input"
        )
    tensors: dict[str, _Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise InvalidArgumentError(
                f"unknown input tensor {tensor.name[:64]!r}; a generative model takes {', '.join(INPUTS)}"
            )
        if tensor.name in tensors:
            raise InvalidArgumentError(f"input '{tensor.name}' is sent twice")
        if raw and tensor.contents.ListFields():
            raise InvalidArgumentError(
                "raw_input_contents and typed input contents are mixed; send every input in one of them"
            )
        if list(tensor.shape) not in ([1], [1, 1]):
            raise InvalidArgumentError(
                f"input '{tensor.name}' has shape {list(tensor.shape)}; it holds one element: use shape [1]"
            )
        tensors[tensor.name] = (tensor, raw[index] if raw else None)
    return tensors


def _text(tensors: Mapping[str, _Tensor], name: str) -> str | None:
    """The UTF-8 text of the BYTES input ``name``, or None when it was not sent."""
    if name not in tensors:
        return None
    tensor, raw = tensors[name]
    if tensor.datatype != "BYTES":
        raise InvalidArgumentError(f"input '{name}' has datatype {tensor.datatype!r}; it must be BYTES (UTF-8 text)")
    if raw is not None:
        (element,) = decode_bytes_elements(raw, 1, tensor=name)
    else:
        elements = tensor.contents.bytes_contents
        if len(elements) != 1:
            raise InvalidArgumentError(
                f"input '{name}' holds {len(elements)} elements in contents.bytes_contents; it takes one"
            )
        element = elements[0]
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"input '{name}' is not valid UTF-8") from None


def _flag(tensors: Mapping[str, _Tensor], name: str) -> bool | None:
    """The value of the BOOL input ``name``, or None when it was not sent."""
    if name not in tensors:
        return None
    tensor, raw = tensors[name]
    if tensor.datatype != "BOOL":
        raise InvalidArgumentError(f"input '{name}' has datatype {tensor.datatype!r}; it must be BOOL")
    if raw is not None:
        # One byte per element, 0 or 1 (numpy's bool, as tritonclient sends it).
        if len(raw) != 1 or raw[0] > 1:
            raise InvalidArgumentError(f"input '{name}': a raw BOOL element is one byte, 0 or 1; got {len(raw)} bytes")
        return raw[0] == 1
    elements = tensor.contents.bool_contents
    if len(elements) != 1:
        raise InvalidArgumentError(f"input '{name}' holds {len(elements)} elements in contents.bool_contents")
    return bool(elements[0])


def _check_outputs(request: oip.ModelInferRequest) -> None:
    for output in request.outputs:
        if output.name != TEXT_OUTPUT:
            raise InvalidArgumentError(
                f"unknown output tensor {output.name[:64]!r}; a generative model returns '{TEXT_OUTPUT}'"
            )


@dataclass(frozen=True)
class _Reserved:
    empty_final: bool = False
    timeout_s: float | None = None


def _request_parameters(parameters: Mapping[str, oip.InferParameter]) -> tuple[dict[str, _Value], _Reserved]:
    """The sampling values among the request parameters, and Triton's reserved ones."""
    values: dict[str, _Value] = {}
    empty_final, timeout_s = False, None
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        value = getattr(parameter, which) if which is not None else None
        where = f"parameter '{name}'"
        if name in SAMPLING_KEYS:
            values[name] = _Value(value, where)
        elif name == EMPTY_FINAL:
            if which != "bool_param":
                raise InvalidArgumentError(f"{where} must be a bool_param")
            empty_final = bool(value)
        elif name == TIMEOUT_US:
            micros = _Value(value, where).as_int()
            if micros is not None and micros < 0:
                raise InvalidArgumentError(f"{where} is in microseconds and must be 0 (none) or more, got {micros}")
            timeout_s = micros / 1e6 if micros else None
        elif name in SEQUENCE_PARAMETERS:
            raise InvalidArgumentError(
                f"{where}: sequences are not supported; a generative deployment keeps no state between requests "
                "(send the whole conversation in 'messages')"
            )
        elif name == PRIORITY or name.startswith(_TRITON_PREFIX):
            # Gristmill has no priorities; Triton itself ignores reserved names it does not know.
            continue
        else:
            raise InvalidArgumentError(
                f"unknown request parameter {name[:64]!r}; a generative model takes {', '.join(SAMPLING_KEYS)} "
                f"(and Triton's {EMPTY_FINAL}, {TIMEOUT_US}, {PRIORITY})"
            )
    return values, _Reserved(empty_final, timeout_s)


def _sampling_object(text: str) -> dict[str, _Value]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"input '{SAMPLING_INPUT}' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f'input \'{SAMPLING_INPUT}\' must be a JSON object such as {{"temperature": 0.7, "max_tokens": 64}}'
        )
    unknown = sorted(set(value) - set(SAMPLING_KEYS))
    if unknown:
        raise InvalidArgumentError(
            f"input '{SAMPLING_INPUT}': unknown key(s) {', '.join(repr(k[:64]) for k in unknown[:4])}; "
            f"a generative model takes {', '.join(SAMPLING_KEYS)}"
        )
    return {key: _Value(item, f"{SAMPLING_INPUT}.{key}") for key, item in value.items()}


@dataclass(frozen=True)
class _Value:
    """A sampling value as sent (a JSON value or a parameter's), and where it came from for error messages.
    Numbers may come as strings ("0.7"), as Triton's vLLM backend accepts them; null means unset."""

    raw: Any
    where: str

    def as_float(self) -> float | None:
        value = self.raw
        if value is None:
            return None
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise InvalidArgumentError(f"{self.where} must be a number, got {_show(value)}")

    def as_int(self) -> int | None:
        value = self.raw
        if value is None:
            return None
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise InvalidArgumentError(f"{self.where} must be an integer, got {_show(value)}")

    def as_strings(self) -> tuple[str, ...]:
        value = self.raw
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise InvalidArgumentError(f"{self.where} must be a string or a list of strings, got {_show(value)}")


def _show(value: Any) -> str:
    return repr(value)[:64]


def _float(values: Mapping[str, _Value], key: str) -> float | None:
    return values[key].as_float() if key in values else None


def _int(values: Mapping[str, _Value], key: str) -> int | None:
    return values[key].as_int() if key in values else None


def _stop(values: Mapping[str, _Value]) -> tuple[str, ...]:
    return values[STOP].as_strings() if STOP in values else ()


# -- responses ------------------------------------------------------------------------------------------------


def _infer_response(request: oip.ModelInferRequest, generation: Generation, *, final: bool) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(
        model_name=request.model_name, model_version=str(generation.version), id=request.id
    )
    response.parameters[FINAL_RESPONSE].bool_param = final
    return response


def text_response(
    request: oip.ModelInferRequest, generation: Generation, text: str, *, final: bool = False
) -> oip.ModelStreamInferResponse:
    """A response holding ``text`` as ``text_output`` (BYTES [1], raw, as tritonclient's ``as_numpy`` reads)."""
    response = _infer_response(request, generation, final=final)
    response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
    response.raw_output_contents.append(encode_bytes_elements([text.encode("utf-8")]))
    return oip.ModelStreamInferResponse(infer_response=response)


def final_responses(
    request: oip.ModelInferRequest,
    generation: Generation,
    text: str,
    last: GenerationChunk,
    *,
    empty_final: bool,
) -> list[oip.ModelStreamInferResponse]:
    """The last response(s) of a request: ``text`` (the last chunk's, or the whole reply) with the final flag, the
    finish reason and the usage; with ``empty_final`` the text (if any) first, then a response without outputs
    carrying the flag, as from a Triton backend that sends its final flag on its own."""
    assert last.finish_reason is not None, "the last chunk has a finish reason"
    if empty_final:
        responses = [text_response(request, generation, text)] if text else []
        final = oip.ModelStreamInferResponse(infer_response=_infer_response(request, generation, final=True))
        responses.append(final)
    else:
        final = text_response(request, generation, text, final=True)
        responses = [final]
    usage = last.usage or Usage(generation.prompt_tokens, generation.completion_tokens)
    parameters = final.infer_response.parameters
    parameters[FINISH_REASON].string_param = last.finish_reason.value
    parameters[PROMPT_TOKENS].int64_param = usage.prompt_tokens
    parameters[COMPLETION_TOKENS].int64_param = usage.completion_tokens
    parameters[REQUEST_ID].string_param = generation.request_id
    return responses


def error_response(request: oip.ModelInferRequest, code: grpc.StatusCode, message: str) -> oip.ModelStreamInferResponse:
    """A request's failure: its id (so the client knows which), the status as tritonclient prints a failed call's,
    and the final flag (nothing more comes for it)."""
    response = oip.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    response.parameters[FINAL_RESPONSE].bool_param = True
    return oip.ModelStreamInferResponse(error_message=f"[{code}] {message}", infer_response=response)
