"""Proto ↔ domain conversions, and the Open Inference Protocol's tensor encodings.

The proto's "zero means the default" rules are applied here, once, so the domain always sees concrete
values. BYTES tensors are a sequence of elements, each a 4-byte little-endian length and that many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.common.v1 import common_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.serving.v1 import serving_pb2
from gristmill.core.chat import ROLES, ChatMessage, FeedbackKind
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.values import TensorSpec
from gristmill.serving.domain.feedback import FeedbackInput
from gristmill.serving.domain.generation import (
    FinishReason,
    FormatKind,
    Generation,
    GenerationChunk,
    ResponseFormat,
    SamplingParams,
)
from gristmill.serving.domain.model import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_DELAY_MS,
    DEFAULT_UNCERTAINTY_THRESHOLD,
    MAX_TEXTS_PER_REQUEST,
    QUEUE_PER_BATCH,
    BatchingConfig,
    CanaryRoute,
    DeploymentSpec,
    LengthPolicy,
    OverLengthAction,
    PredictionLoggingConfig,
    Quantization,
    VersionSelector,
)
from gristmill.serving.domain.predictions import PredictionResult
from gristmill.serving.domain.sources import ResolvedVersion
from gristmill.serving.domain.versions import DeploymentState, DeploymentView, VersionState

# -- selectors and deployments --------------------------------------------------------------------------------


def selector_from_proto(selector: common_pb2.ModelVersionSelector, *, what: str) -> VersionSelector | None:
    """None when neither a version nor an alias is set."""
    which = selector.WhichOneof("selector")
    if which == "version":
        if selector.version < 1:
            raise InvalidArgumentError(f"{what}.version must be 1 or more, got {selector.version}")
        return VersionSelector.of_version(selector.version)
    if which == "alias":
        if not selector.alias:
            raise InvalidArgumentError(f"{what}.alias is empty; name an alias such as 'production'")
        return VersionSelector.of_alias(selector.alias)
    return None


def selector_to_proto(selector: VersionSelector) -> common_pb2.ModelVersionSelector:
    if selector.version is not None:
        return common_pb2.ModelVersionSelector(version=selector.version)
    return common_pb2.ModelVersionSelector(alias=selector.alias or "")


_QUANTIZATION = {
    serving_pb2.QUANTIZATION_UNSPECIFIED: Quantization.NONE,
    serving_pb2.QUANTIZATION_NONE: Quantization.NONE,
    serving_pb2.QUANTIZATION_DYNAMIC_INT8: Quantization.DYNAMIC_INT8,
    serving_pb2.QUANTIZATION_BF16: Quantization.BF16,
}
_QUANTIZATION_OUT = {
    Quantization.NONE: serving_pb2.QUANTIZATION_NONE,
    Quantization.DYNAMIC_INT8: serving_pb2.QUANTIZATION_DYNAMIC_INT8,
    Quantization.BF16: serving_pb2.QUANTIZATION_BF16,
}
_OVER_LENGTH = {
    serving_pb2.OVER_LENGTH_ACTION_UNSPECIFIED: OverLengthAction.TRUNCATE,
    serving_pb2.OVER_LENGTH_ACTION_TRUNCATE: OverLengthAction.TRUNCATE,
    serving_pb2.OVER_LENGTH_ACTION_REJECT: OverLengthAction.REJECT,
}
_OVER_LENGTH_OUT = {
    OverLengthAction.TRUNCATE: serving_pb2.OVER_LENGTH_ACTION_TRUNCATE,
    OverLengthAction.REJECT: serving_pb2.OVER_LENGTH_ACTION_REJECT,
}
_DEPLOYMENT_STATE = {
    DeploymentState.LOADING: serving_pb2.DEPLOYMENT_STATE_LOADING,
    DeploymentState.READY: serving_pb2.DEPLOYMENT_STATE_READY,
    DeploymentState.DEGRADED: serving_pb2.DEPLOYMENT_STATE_DEGRADED,
    DeploymentState.FAILED: serving_pb2.DEPLOYMENT_STATE_FAILED,
}
_VERSION_STATE = {
    VersionState.LOADING: serving_pb2.LOADED_VERSION_STATE_LOADING,
    VersionState.READY: serving_pb2.LOADED_VERSION_STATE_READY,
    VersionState.DRAINING: serving_pb2.LOADED_VERSION_STATE_DRAINING,
    VersionState.FAILED: serving_pb2.LOADED_VERSION_STATE_FAILED,
}


def spec_from_proto(
    deployment: serving_pb2.Deployment,
    *,
    organization_id: str,
    create_time: datetime,
    update_time: datetime,
) -> DeploymentSpec:
    """A spec with every default filled in; ranges are checked by ``validate_spec``."""
    if not deployment.registered_model_name:
        raise InvalidArgumentError("deployment.registered_model_name is required: the registry model to serve")
    target = selector_from_proto(deployment.target, what="deployment.target")
    canary = None
    if deployment.HasField("canary"):
        canary_target = selector_from_proto(deployment.canary.target, what="deployment.canary.target")
        if canary_target is None:
            raise InvalidArgumentError(
                "deployment.canary.target needs a version or an alias (leave canary unset for no canary)"
            )
        canary = CanaryRoute(canary_target, deployment.canary.weight)
    batching = deployment.batching
    batch_size = batching.max_batch_size or DEFAULT_BATCH_SIZE
    if deployment.quantization not in _QUANTIZATION:
        raise InvalidArgumentError(f"deployment.quantization {deployment.quantization} is not a known value")
    length = deployment.length_policy
    if length.over_length_action not in _OVER_LENGTH:
        raise InvalidArgumentError(
            f"deployment.length_policy.over_length_action {length.over_length_action} is not a known value"
        )
    logging = deployment.prediction_logging
    return DeploymentSpec(
        organization_id=organization_id,
        name=deployment.name or deployment.registered_model_name,
        registered_model_name=deployment.registered_model_name,
        target=target or VersionSelector.of_alias("production"),
        canary=canary,
        batching=BatchingConfig(
            max_batch_size=batch_size,
            max_delay_ms=batching.max_delay_ms if batching.HasField("max_delay_ms") else DEFAULT_MAX_DELAY_MS,
            max_queue_size=batching.max_queue_size or QUEUE_PER_BATCH * max(batch_size, 1),
        ),
        quantization=_QUANTIZATION[deployment.quantization],
        length_policy=LengthPolicy(length.max_tokens, _OVER_LENGTH[length.over_length_action]),
        prediction_logging=PredictionLoggingConfig(
            sample_rate=logging.sample_rate,
            uncertainty_threshold=logging.uncertainty_threshold
            if logging.HasField("uncertainty_threshold")
            else DEFAULT_UNCERTAINTY_THRESHOLD,
        ),
        ensemble=tuple(deployment.ensemble_versions),
        create_time=create_time,
        update_time=update_time,
    )


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def spec_to_proto(spec: DeploymentSpec) -> serving_pb2.Deployment:
    """The configuration part of a ``Deployment`` (no status)."""
    deployment = serving_pb2.Deployment(
        name=spec.name,
        organization_id=spec.organization_id,
        registered_model_name=spec.registered_model_name,
        target=selector_to_proto(spec.target),
        batching=serving_pb2.BatchingConfig(
            max_batch_size=spec.batching.max_batch_size,
            max_delay_ms=spec.batching.max_delay_ms,
            max_queue_size=spec.batching.max_queue_size,
        ),
        quantization=_QUANTIZATION_OUT[spec.quantization],
        length_policy=serving_pb2.LengthPolicy(
            max_tokens=spec.length_policy.max_tokens,
            over_length_action=_OVER_LENGTH_OUT[spec.length_policy.over_length_action],
        ),
        prediction_logging=serving_pb2.PredictionLoggingConfig(
            sample_rate=spec.prediction_logging.sample_rate,
            uncertainty_threshold=spec.prediction_logging.uncertainty_threshold,
        ),
        create_time=_timestamp(spec.create_time),
        update_time=_timestamp(spec.update_time),
        ensemble_versions=list(spec.ensemble),
    )
    if spec.canary is not None:
        deployment.canary.CopyFrom(
            serving_pb2.CanaryRoute(target=selector_to_proto(spec.canary.target), weight=spec.canary.weight)
        )
    return deployment


def deployment_to_proto(view: DeploymentView) -> serving_pb2.Deployment:
    deployment = spec_to_proto(view.spec)
    status = deployment.status
    status.state = _DEPLOYMENT_STATE[view.state]
    status.message = view.message
    for version in view.versions:
        status.versions.append(
            serving_pb2.LoadedVersion(
                version=version.version,
                state=_VERSION_STATE[version.state],
                traffic_weight=version.traffic_weight,
                error=version.error,
                ready_time=_timestamp(version.ready_time),
                request_count=version.request_count,
                error_count=version.error_count,
                latency_p50_ms=version.latency_p50_ms,
                latency_p99_ms=version.latency_p99_ms,
                memory_bytes=version.memory_bytes,
            )
        )
    return deployment


# Field-mask paths UpdateDeployment accepts (serving.proto).
UPDATABLE_PATHS = frozenset(
    {
        "target",
        "canary",
        "canary.target",
        "canary.weight",
        "batching",
        "batching.max_batch_size",
        "batching.max_delay_ms",
        "batching.max_queue_size",
        "quantization",
        "length_policy",
        "length_policy.max_tokens",
        "length_policy.over_length_action",
        "prediction_logging",
        "prediction_logging.sample_rate",
        "prediction_logging.uncertainty_threshold",
        "ensemble_versions",
    }
)


def apply_update_mask(
    mask: field_mask_pb2.FieldMask, source: serving_pb2.Deployment, destination: serving_pb2.Deployment
) -> None:
    """Copy the masked fields of ``source`` into ``destination``; a masked field unset in ``source`` is reset.

    protobuf's ``MergeMessage`` leaves an unset optional scalar (``batching.max_delay_ms``) as it was; resetting
    it instead lets a caller go back to the documented default.
    """
    # A repeated field (ensemble_versions) is replaced as a whole, not appended to.
    mask.MergeMessage(source, destination, replace_message_field=True, replace_repeated_field=True)
    for path in mask.paths:
        *parents, leaf = path.split(".")
        src: Message = source
        dst: Message = destination
        for name in parents:
            src, dst = getattr(src, name), getattr(dst, name)
        field = src.DESCRIPTOR.fields_by_name[leaf]
        if field.has_presence and not src.HasField(leaf):
            dst.ClearField(leaf)


def predict_response(result: PredictionResult) -> serving_pb2.PredictResponse:
    response = serving_pb2.PredictResponse(
        registered_model_name=result.registered_model_name,
        model_version=result.version,
        request_id=result.request_id,
    )
    for index, prediction in enumerate(result.predictions):
        message = serving_pb2.TextPrediction(
            label=prediction.label,
            labels=list(prediction.labels),
            probabilities={n: float(p) for n, p in zip(result.label_names, prediction.probabilities, strict=True)},
            top_probability=prediction.top_probability,
            uncertain=prediction.uncertain,
        )
        if result.explanations:
            explanation = result.explanations[index]
            message.explained_label = result.label_names[explanation.label_index]
            message.attribution_delta = explanation.delta
            message.attributions.extend(
                serving_pb2.TokenAttribution(token=t.token, start=t.start, end=t.end, score=t.score)
                for t in explanation.tokens
            )
        response.predictions.append(message)
    return response


# -- Open Inference Protocol ----------------------------------------------------------------------------------

INPUT_NAME = "text"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"
OUTPUT_LABEL_INDEX = "label_index"
OUTPUTS = (OUTPUT_PROBABILITIES, OUTPUT_LABEL, OUTPUT_LABEL_INDEX)
_LENGTH = struct.Struct("<I")


def messages_from_proto(messages: Sequence[common_pb2.ChatMessage]) -> list[ChatMessage]:
    out = []
    for index, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgumentError(
                f"messages[{index}].role: unknown role {m.role[:40]!r}; roles: {', '.join(ROLES)}"
            )
        out.append(ChatMessage(m.role, m.content, m.tool_calls, m.tool_call_id, m.name))
    return out


def sampling_from_proto(request: serving_pb2.GenerateRequest) -> SamplingParams:
    """The request's sampling parameters; unset ones take the OpenAI defaults (temperature 1, top_p 1)."""
    defaults = SamplingParams()
    return SamplingParams(
        temperature=request.temperature if request.HasField("temperature") else defaults.temperature,
        top_p=request.top_p if request.HasField("top_p") else defaults.top_p,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        min_tokens=request.min_tokens,
    )


def response_format_from_proto(request: serving_pb2.GenerateRequest) -> ResponseFormat | None:
    if not request.HasField("response_format"):
        return None
    chosen = request.response_format.WhichOneof("format")
    if chosen == "json_schema":
        return ResponseFormat(FormatKind.JSON_SCHEMA, request.response_format.json_schema)
    if chosen == "json_object" and request.response_format.json_object:
        return ResponseFormat(FormatKind.JSON_OBJECT)
    raise InvalidArgumentError("response_format needs json_object set to true or a json_schema")


_FINISH_REASONS = {
    FinishReason.STOP: serving_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: serving_pb2.FINISH_REASON_LENGTH,
}


def generate_response(chunk: GenerationChunk, generation: Generation) -> serving_pb2.GenerateResponse:
    response = serving_pb2.GenerateResponse(
        text=chunk.text,
        token_ids=list(chunk.token_ids),
        request_id=generation.request_id,
        registered_model_name=generation.registered_model_name,
        model_version=generation.version,
    )
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[chunk.finish_reason]
    if chunk.usage is not None:
        response.usage.prompt_tokens = chunk.usage.prompt_tokens
        response.usage.completion_tokens = chunk.usage.completion_tokens
    return response


_FEEDBACK_KINDS = {
    serving_pb2.FEEDBACK_KIND_THUMBS_UP: FeedbackKind.THUMBS_UP,
    serving_pb2.FEEDBACK_KIND_THUMBS_DOWN: FeedbackKind.THUMBS_DOWN,
    serving_pb2.FEEDBACK_KIND_RATING: FeedbackKind.RATING,
    serving_pb2.FEEDBACK_KIND_REGENERATE: FeedbackKind.REGENERATE,
    serving_pb2.FEEDBACK_KIND_EDIT: FeedbackKind.EDIT,
    serving_pb2.FEEDBACK_KIND_TEXT: FeedbackKind.TEXT,
}


def feedback_from_proto(request: serving_pb2.RecordFeedbackRequest) -> FeedbackInput:
    kind = _FEEDBACK_KINDS.get(request.kind)
    if kind is None:
        raise InvalidArgumentError(
            "kind is required: thumbs_up, thumbs_down, rating, regenerate, edit or text (FEEDBACK_KIND_...)"
        )
    return FeedbackInput(
        request_id=request.request_id,
        kind=kind,
        rating=request.rating,
        edited_reply=request.edited_reply,
        kept_reply=request.kept_reply,
        discarded_reply=request.discarded_reply,
        text=request.text,
    )


def decode_bytes_elements(raw: bytes, count: int, *, tensor: str) -> list[bytes]:
    """Split a raw BYTES tensor into ``count`` elements; ``InvalidArgumentError`` naming what is malformed."""
    items: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if len(items) == count:
            raise InvalidArgumentError(
                f"input '{tensor}': malformed BYTES framing: {size - offset} bytes left after the {count} elements "
                "its shape declares"
            )
        if offset + 4 > size:
            raise InvalidArgumentError(
                f"input '{tensor}': malformed BYTES framing: element {len(items)} is cut off in its 4-byte "
                "little-endian length prefix"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidArgumentError(
                f"input '{tensor}': malformed BYTES framing: element {len(items)} declares {length} bytes but only "
                f"{size - offset} remain"
            )
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise InvalidArgumentError(f"input '{tensor}' holds {len(items)} BYTES elements but its shape declares {count}")
    return items


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def _has_typed_contents(contents: oip.InferTensorContents) -> bool:
    return any(contents.ListFields())


def texts_from_infer_request(request: oip.ModelInferRequest) -> list[str]:
    """The texts of a ModelInfer request: one BYTES tensor "text" of shape [batch] or [batch, 1]."""
    if len(request.inputs) != 1:
        raise InvalidArgumentError(
            f"ModelInfer takes exactly one input tensor, '{INPUT_NAME}' (BYTES, shape [batch] or [batch, 1]); "
            f"got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidArgumentError(
            f"unknown input tensor {tensor.name!r}: this model takes one BYTES tensor named '{INPUT_NAME}'"
        )
    if tensor.datatype != "BYTES":
        raise InvalidArgumentError(
            f"input '{INPUT_NAME}' has datatype {tensor.datatype!r}; it must be BYTES (UTF-8 texts)"
        )
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidArgumentError(f"input '{INPUT_NAME}' has shape {shape}; use [batch] or [batch, 1]")
    count = shape[0]
    if count < 1:
        raise InvalidArgumentError(
            f"input '{INPUT_NAME}' has shape {shape}: the batch is empty; send at least one text"
        )
    if count > MAX_TEXTS_PER_REQUEST:
        raise InvalidArgumentError(
            f"input '{INPUT_NAME}' holds {count} texts; the limit is {MAX_TEXTS_PER_REQUEST} per request"
        )
    if request.raw_input_contents:
        if _has_typed_contents(tensor.contents):
            raise InvalidArgumentError(
                "raw_input_contents and typed input contents are mixed; send the texts in one of them"
            )
        if len(request.raw_input_contents) != 1:
            raise InvalidArgumentError(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input tensor"
            )
        elements = decode_bytes_elements(request.raw_input_contents[0], count, tensor=INPUT_NAME)
    else:
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise InvalidArgumentError(
                f"input '{INPUT_NAME}' holds {len(elements)} texts in contents.bytes_contents but its shape "
                f"declares {count} (or send them in raw_input_contents)"
            )
    texts = []
    for index, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"element {index} of input '{INPUT_NAME}' is not valid UTF-8") from None
    return texts


def requested_outputs(request: oip.ModelInferRequest) -> list[str]:
    if not request.outputs:
        return list(OUTPUTS)
    names: list[str] = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise InvalidArgumentError(
                f"unknown output tensor {output.name!r}; this model returns {', '.join(OUTPUTS)}"
            )
        if output.name not in names:
            names.append(output.name)
    return names


def infer_response(
    request: oip.ModelInferRequest, result: PredictionResult, outputs: Sequence[str]
) -> oip.ModelInferResponse:
    """Outputs in ``raw_output_contents`` (what tritonclient's ``as_numpy`` reads), in the requested order."""
    response = oip.ModelInferResponse(model_name=request.model_name, model_version=str(result.version), id=request.id)
    count = len(result.predictions)
    for name in outputs:
        if name == OUTPUT_PROBABILITIES:
            matrix = np.asarray([p.probabilities for p in result.predictions], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=[count, len(result.label_names)])
            response.raw_output_contents.append(matrix.tobytes())
        elif name == OUTPUT_LABEL:
            response.outputs.add(name=name, datatype="BYTES", shape=[count])
            response.raw_output_contents.append(
                encode_bytes_elements([p.label.encode("utf-8") for p in result.predictions])
            )
        else:
            indices = np.asarray([p.label_index for p in result.predictions], dtype="<i8")
            response.outputs.add(name=name, datatype="INT64", shape=[count])
            response.raw_output_contents.append(indices.tobytes())
    return response


def model_metadata(
    name: str, versions: Sequence[int], resolved: ResolvedVersion, labels: int
) -> oip.ModelMetadataResponse:
    inputs = resolved.inputs or (TensorSpec(INPUT_NAME, "BYTES", (-1,)),)
    outputs = resolved.outputs or (
        TensorSpec(OUTPUT_PROBABILITIES, "FP32", (-1, labels)),
        TensorSpec(OUTPUT_LABEL, "BYTES", (-1,)),
        TensorSpec(OUTPUT_LABEL_INDEX, "INT64", (-1,)),
    )
    tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        platform="pytorch",
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in outputs],
    )
