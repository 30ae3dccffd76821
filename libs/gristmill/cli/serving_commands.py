"""Serving commands: ``deploy``, ``deployments`` and ``predict`` (typed, or the Open Inference Protocol)."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.cli.context import state, want_json
from gristmill.cli.output import emit, emit_messages, emit_object, enum_name, fail, one_line_errors
from gristmill.client import Gristmill

JSON_OPTION = typer.Option(False, "--json", help="print JSON")


def deployment_row(d: sv.Deployment) -> dict[str, Any]:
    target = d.target.alias or (f"v{d.target.version}" if d.target.version else "production")
    versions = ", ".join(
        f"v{v.version} {enum_name(sv.LoadedVersionState.Name(v.state), 'LOADED_VERSION_STATE_')}"
        + (f" {v.traffic_weight:.0%}" if v.traffic_weight else "")
        for v in d.status.versions
    )
    return {
        "deployment": d.name,
        "model": d.registered_model_name,
        "target": target,
        "state": enum_name(sv.DeploymentState.Name(d.status.state), "DEPLOYMENT_STATE_"),
        "versions": versions,
        "message": d.status.message[:100],
    }


def deployment_request(
    name: str, model: str, *, alias: str, version: int, uncertainty: float | None, sample_rate: float
) -> sv.Deployment:
    if alias and version:
        fail("give --alias or --version, not both", code=2)
    target = (
        common_pb2.ModelVersionSelector(version=version) if version else common_pb2.ModelVersionSelector(alias=alias)
    )
    logging_config = sv.PredictionLoggingConfig(sample_rate=sample_rate)
    if uncertainty is not None:
        logging_config.uncertainty_threshold = uncertainty
    return sv.Deployment(
        name=name or model, registered_model_name=model, target=target, prediction_logging=logging_config
    )


@one_line_errors
def deploy_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="registered model to serve"),
    name: str = typer.Option("", help="deployment name clients use (default: the model's name)"),
    alias: str = typer.Option("production", help="follow this alias (hot-swaps when it moves)"),
    version: int = typer.Option(0, help="serve this fixed version instead of an alias"),
    uncertainty: float | None = typer.Option(
        None, help="predictions below this top probability are logged for labeling (default 0.6)"
    ),
    sample_rate: float = typer.Option(0.0, help="fraction of all predictions logged"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until the model is loaded"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a deployment for a registered model (following an alias, or a fixed version)."""
    deployment = deployment_request(
        name, model, alias="" if version else alias, version=version, uncertainty=uncertainty, sample_rate=sample_rate
    )
    with state(ctx).client() as gm:
        created = gm.serving.CreateDeployment(sv.CreateDeploymentRequest(deployment=deployment, wait_until_ready=wait))
    emit_object(deployment_row(created), want_json(ctx, as_json), raw=created)


@one_line_errors
def deployments_command(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Deployments and the state of each loaded version."""
    with state(ctx).client() as gm:
        reply = gm.serving.ListDeployments(sv.ListDeploymentsRequest())
    emit_messages(reply.deployments, deployment_row, want_json(ctx, as_json))


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probability: float
    uncertain: bool | None  # the typed API says; the OIP answer does not carry it
    version: str


def encode_bytes(values: list[str]) -> bytes:
    """An OIP BYTES tensor's raw contents: each element as a 4-byte little-endian length, then its bytes."""
    out = bytearray()
    for value in values:
        data = value.encode("utf-8")
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def decode_bytes(raw: bytes) -> list[str]:
    values, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        values.append(raw[offset : offset + length].decode("utf-8"))
        offset += length
    return values


def predict_typed(gm: Gristmill, deployment: str, texts: list[str], request_id: str = "") -> list[Prediction]:
    reply = gm.serving.Predict(sv.PredictRequest(model=deployment, texts=texts, request_id=request_id))
    version = f"{reply.registered_model_name} v{reply.model_version}"
    return [
        Prediction(text, p.label, p.top_probability, p.uncertain, version)
        for text, p in zip(texts, reply.predictions, strict=True)
    ]


def predict_oip(gm: Gristmill, deployment: str, texts: list[str], request_id: str = "") -> list[Prediction]:
    """The same through ``inference.GRPCInferenceService/ModelInfer`` (what KServe and Triton clients send)."""
    request = oip.ModelInferRequest(
        model_name=deployment,
        id=request_id or uuid.uuid4().hex,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[len(texts)])],
        raw_input_contents=[encode_bytes(texts)],
    )
    reply = gm.inference.ModelInfer(request)
    outputs = {o.name: (o, raw) for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)}
    if "label" not in outputs or "probabilities" not in outputs:
        fail(f"the server answered without 'label' and 'probabilities' outputs ({', '.join(outputs)})")
    labels = decode_bytes(outputs["label"][1])
    probs_tensor, probs_raw = outputs["probabilities"]
    width = int(probs_tensor.shape[-1]) if probs_tensor.shape else 1
    flat = struct.unpack(f"<{len(probs_raw) // 4}f", probs_raw)
    version = f"{reply.model_name} v{reply.model_version}" if reply.model_version else reply.model_name
    result = []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        row = flat[i * width : (i + 1) * width]
        result.append(Prediction(text, label, max(row) if row else 0.0, None, version))
    return result


@one_line_errors
def predict_command(
    ctx: typer.Context,
    deployment: str = typer.Argument(..., help="deployment name"),
    texts: list[str] = typer.Argument(..., help="texts to classify"),
    use_oip: bool = typer.Option(False, "--oip", help="call ModelInfer (Open Inference Protocol v2)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Classify texts with a deployed model."""
    if any(not t.strip() for t in texts):
        fail("every text must be non-empty", code=2)
    with state(ctx).client() as gm:
        predictions = (predict_oip if use_oip else predict_typed)(gm, deployment, list(texts))
    rows = [
        {
            "label": p.label,
            "probability": round(p.probability, 4),
            **({} if p.uncertain is None else {"uncertain": p.uncertain}),
            "model": p.version,
            "text": p.text[:60],
        }
        for p in predictions
    ]
    emit(rows, want_json(ctx, as_json))
