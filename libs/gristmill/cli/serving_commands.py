"""Serving commands: ``deploy``, ``deployments`` (list, show, update, delete) and ``predict`` (typed, or the Open
Inference Protocol)."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.cli.context import state, want_json
from gristmill.cli.options import JSON_OPTION, choice, read_text_option
from gristmill.cli.output import confirm, emit, emit_object, enum_name, fail, one_line_errors
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION
from gristmill.cli.replies import show_one, show_pages
from gristmill.client import Gristmill


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


QUANTIZATIONS = {"none": sv.QUANTIZATION_NONE, "int8": sv.QUANTIZATION_DYNAMIC_INT8, "bf16": sv.QUANTIZATION_BF16}
OVER_LENGTH = {"truncate": sv.OVER_LENGTH_ACTION_TRUNCATE, "reject": sv.OVER_LENGTH_ACTION_REJECT}

deployments_app = typer.Typer(
    help="Deployments: list (the default), show, update (canary, batching, quantization...), delete.",
    invoke_without_command=True,
)


@dataclass(frozen=True)
class DeploymentSettings:
    """The options ``deploy`` and ``deployments update`` share; None (or '') means "not given"."""

    canary_version: int = 0
    canary_alias: str = ""
    canary_weight: float | None = None
    quantization: str = ""
    max_batch_size: int | None = None
    max_delay_ms: int | None = None
    max_queue_size: int | None = None
    max_tokens: int | None = None
    over_length: str = ""
    uncertainty: float | None = None
    sample_rate: float | None = None
    # "2,3": versions averaged with the target's; "none" ends an ensemble.
    ensemble: str = ""


def ensemble_versions(text: str) -> list[int]:
    """``--ensemble``'s version numbers ("2,3"; "none" for none); anything else is a usage error."""
    if text.strip().lower() == "none":
        return []
    try:
        versions = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--ensemble takes version numbers separated by commas (2,3) or none, got {text!r}", code=2)
    if not versions:
        fail("--ensemble takes version numbers separated by commas (2,3) or none", code=2)
    return versions


def version_or_alias(version: int, alias: str) -> common_pb2.ModelVersionSelector:
    """A fixed version when one is given, else the alias."""
    return common_pb2.ModelVersionSelector(version=version) if version else common_pb2.ModelVersionSelector(alias=alias)


def canary_route(settings: DeploymentSettings) -> sv.CanaryRoute | None:
    """The canary the options ask for (None: no canary option given); bad combinations are usage errors."""
    given_target = bool(settings.canary_version or settings.canary_alias)
    if settings.canary_version and settings.canary_alias:
        fail("give --canary-version or --canary-alias, not both", code=2)
    if settings.canary_weight is None:
        if given_target:
            fail("a canary needs --canary-weight W (the share of traffic it takes, 0 < W < 1)", code=2)
        return None
    if not 0.0 < settings.canary_weight < 1.0:
        fail(f"--canary-weight must be between 0 and 1 (exclusive), got {settings.canary_weight:g}", code=2)
    if not given_target:
        fail("--canary-weight needs the canary's version or alias: --canary-version V or --canary-alias A", code=2)
    canary_target = version_or_alias(settings.canary_version, settings.canary_alias)
    return sv.CanaryRoute(target=canary_target, weight=settings.canary_weight)


def apply_settings(deployment: sv.Deployment, settings: DeploymentSettings) -> list[str]:
    """Write the given options into ``deployment``; returns the update-mask paths they touch."""
    paths: list[str] = []
    canary = canary_route(settings)
    if canary is not None:
        deployment.canary.CopyFrom(canary)
        paths.append("canary")
    if settings.quantization:
        deployment.quantization = choice(settings.quantization, QUANTIZATIONS, "--quantization")
        paths.append("quantization")
    batching = deployment.batching
    if settings.max_batch_size is not None:
        batching.max_batch_size = settings.max_batch_size
        paths.append("batching.max_batch_size")
    if settings.max_delay_ms is not None:
        batching.max_delay_ms = settings.max_delay_ms
        paths.append("batching.max_delay_ms")
    if settings.max_queue_size is not None:
        batching.max_queue_size = settings.max_queue_size
        paths.append("batching.max_queue_size")
    if settings.max_tokens is not None:
        deployment.length_policy.max_tokens = settings.max_tokens
        paths.append("length_policy.max_tokens")
    if settings.over_length:
        deployment.length_policy.over_length_action = choice(settings.over_length, OVER_LENGTH, "--over-length")
        paths.append("length_policy.over_length_action")
    if settings.uncertainty is not None:
        deployment.prediction_logging.uncertainty_threshold = settings.uncertainty
        paths.append("prediction_logging.uncertainty_threshold")
    if settings.sample_rate is not None:
        deployment.prediction_logging.sample_rate = settings.sample_rate
        paths.append("prediction_logging.sample_rate")
    if settings.ensemble:
        deployment.ensemble_versions[:] = ensemble_versions(settings.ensemble)
        paths.append("ensemble_versions")
    return paths


def deployment_request(
    name: str,
    model: str,
    *,
    alias: str,
    version: int,
    uncertainty: float | None,
    sample_rate: float,
    settings: DeploymentSettings | None = None,
) -> sv.Deployment:
    if alias and version:
        fail("give --alias or --version, not both", code=2)
    logging_config = sv.PredictionLoggingConfig(sample_rate=sample_rate)
    if uncertainty is not None:
        logging_config.uncertainty_threshold = uncertainty
    deployment = sv.Deployment(
        name=name or model,
        registered_model_name=model,
        target=version_or_alias(version, alias),
        prediction_logging=logging_config,
    )
    if settings is not None:
        apply_settings(deployment, settings)
    return deployment


def deployment_fields(d: sv.Deployment) -> dict[str, Any]:
    """One deployment in full (``show``, ``deploy``, ``update``): the row, then its serving configuration."""
    canary = ""
    if d.HasField("canary"):
        t = d.canary.target
        canary = f"{t.alias or f'v{t.version}'} {d.canary.weight:.0%}"
    quantization = enum_name(sv.Quantization.Name(d.quantization), "QUANTIZATION_")
    b = d.batching
    batching = (
        f"max {b.max_batch_size or 32} texts, "
        f"{b.max_delay_ms if b.HasField('max_delay_ms') else 5} ms, queue {b.max_queue_size or 'default'}"
    )
    over_length = enum_name(sv.OverLengthAction.Name(d.length_policy.over_length_action), "OVER_LENGTH_ACTION_")
    return {
        **deployment_row(d),
        "canary": canary,
        "ensemble": ", ".join(f"v{v}" for v in d.ensemble_versions),
        "quantization": "none" if quantization == "unspecified" else quantization.replace("dynamic-", ""),
        "batching": batching,
        "length": (f"{d.length_policy.max_tokens} tokens" if d.length_policy.max_tokens else "the training length")
        + ("; longer texts rejected" if over_length == "reject" else "; longer texts truncated"),
    }


CANARY_VERSION_OPTION = typer.Option(0, "--canary-version", min=0, help="a second version taking a share of traffic")
CANARY_ALIAS_OPTION = typer.Option("", "--canary-alias", help="the canary follows this alias instead")
CANARY_WEIGHT_OPTION = typer.Option(
    None, "--canary-weight", help="share of requests routed to the canary, 0 < W < 1 (needs serving.canary)"
)
QUANTIZATION_OPTION = typer.Option(
    "", "--quantization", help="none, int8 (dynamic int8 of linear layers, CPU) or bf16 (bfloat16 weights and compute)"
)
MAX_BATCH_OPTION = typer.Option(None, "--max-batch-size", min=1, max=1024, help="texts per batch (default 32)")
MAX_DELAY_OPTION = typer.Option(None, "--max-delay-ms", min=0, help="longest wait for a batch to fill (default 5)")
MAX_QUEUE_OPTION = typer.Option(None, "--max-queue-size", min=0, help="queued texts before RESOURCE_EXHAUSTED")
MAX_TOKENS_OPTION = typer.Option(None, "--max-tokens", min=0, help="tokens per text (0: the model's training length)")
OVER_LENGTH_OPTION = typer.Option("", "--over-length", help="longer texts: truncate (default) or reject")
ENSEMBLE_OPTION = typer.Option(
    "",
    "--ensemble",
    help="versions whose probabilities are averaged with the target's, e.g. 2,3 (one batch each; none: stop)",
)


@one_line_errors
def deploy_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="registered model to serve"),
    name: str = typer.Option("", help="deployment name clients use (default: the model's name)"),
    alias: str = typer.Option("production", help="follow this alias (hot-swaps when it moves)"),
    version: int = typer.Option(0, help="serve this fixed version instead of an alias"),
    canary_version: int = CANARY_VERSION_OPTION,
    canary_alias: str = CANARY_ALIAS_OPTION,
    canary_weight: float | None = CANARY_WEIGHT_OPTION,
    quantization: str = QUANTIZATION_OPTION,
    max_batch_size: int | None = MAX_BATCH_OPTION,
    max_delay_ms: int | None = MAX_DELAY_OPTION,
    max_queue_size: int | None = MAX_QUEUE_OPTION,
    max_tokens: int | None = MAX_TOKENS_OPTION,
    over_length: str = OVER_LENGTH_OPTION,
    ensemble: str = ENSEMBLE_OPTION,
    uncertainty: float | None = typer.Option(
        None, help="predictions below this top probability are logged for labeling (default 0.6)"
    ),
    sample_rate: float = typer.Option(0.0, help="fraction of all predictions logged"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until the model is loaded"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a deployment for a registered model (following an alias, or a fixed version).

    Optionally with a canary (a second version taking a share of the traffic), int8 quantization, batching and a
    length policy; `deployments update` changes them later.
    """
    settings = DeploymentSettings(
        canary_version=canary_version,
        canary_alias=canary_alias,
        canary_weight=canary_weight,
        quantization=quantization,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue_size=max_queue_size,
        max_tokens=max_tokens,
        over_length=over_length,
        ensemble=ensemble,
    )
    deployment = deployment_request(
        name,
        model,
        alias="" if version else alias,
        version=version,
        uncertainty=uncertainty,
        sample_rate=sample_rate,
        settings=settings,
    )
    request = sv.CreateDeploymentRequest(deployment=deployment, wait_until_ready=wait)
    show_one(ctx, lambda gm: gm.serving.CreateDeployment(request), deployment_fields, as_json)


@deployments_app.callback()
@one_line_errors
def deployments_command(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Deployments and the state of each loaded version (``gristmill deployments`` alone lists them)."""
    if as_json:
        state(ctx).as_json = True  # `deployments --json list` as `deployments list --json`
    if ctx.invoked_subcommand is None:
        deployments_list(ctx, as_json=as_json, page_size=0, page_token="", every_page=False)


@deployments_app.command("list")
@one_line_errors
def deployments_list(
    ctx: typer.Context,
    as_json: bool = JSON_OPTION,
    page_size: int = PAGE_SIZE_OPTION,
    page_token: str = PAGE_TOKEN_OPTION,
    every_page: bool = ALL_OPTION,
) -> None:
    """Deployments and the state of each loaded version."""

    def fetch(gm: Gristmill, page: common_pb2.PageRequest) -> tuple[Sequence[sv.Deployment], str]:
        reply = gm.serving.ListDeployments(sv.ListDeploymentsRequest(page=page))
        return reply.deployments, reply.next_page_token

    show_pages(ctx, fetch, deployment_row, as_json, page_size=page_size, page_token=page_token, every_page=every_page)


@deployments_app.command("show")
@one_line_errors
def deployments_show(
    ctx: typer.Context, name: str = typer.Argument(..., help="deployment name"), as_json: bool = JSON_OPTION
) -> None:
    """One deployment: routing, canary, batching, quantization and each loaded version."""
    request = sv.GetDeploymentRequest(name=name)
    show_one(ctx, lambda gm: gm.serving.GetDeployment(request), deployment_fields, as_json)


@deployments_app.command("update")
@one_line_errors
def deployments_update(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="deployment name"),
    alias: str = typer.Option("", help="follow this alias from now on"),
    version: int = typer.Option(0, min=0, help="serve this fixed version from now on"),
    canary_version: int = CANARY_VERSION_OPTION,
    canary_alias: str = CANARY_ALIAS_OPTION,
    canary_weight: float | None = CANARY_WEIGHT_OPTION,
    no_canary: bool = typer.Option(False, "--no-canary", help="remove the canary (all traffic to the target)"),
    quantization: str = QUANTIZATION_OPTION,
    max_batch_size: int | None = MAX_BATCH_OPTION,
    max_delay_ms: int | None = MAX_DELAY_OPTION,
    max_queue_size: int | None = MAX_QUEUE_OPTION,
    max_tokens: int | None = MAX_TOKENS_OPTION,
    over_length: str = OVER_LENGTH_OPTION,
    ensemble: str = ENSEMBLE_OPTION,
    uncertainty: float | None = typer.Option(None, help="new uncertainty threshold for prediction logging"),
    sample_rate: float | None = typer.Option(None, help="new fraction of all predictions logged"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until a new version or canary is loaded"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a deployment: only what the options name (a new target or canary loads beside the current one)."""
    if alias and version:
        fail("give --alias or --version, not both", code=2)
    if no_canary and (canary_weight is not None or canary_version or canary_alias):
        fail("give --no-canary or a new canary, not both", code=2)
    deployment = sv.Deployment(name=name)
    paths = apply_settings(
        deployment,
        DeploymentSettings(
            canary_version=canary_version,
            canary_alias=canary_alias,
            canary_weight=canary_weight,
            quantization=quantization,
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            max_queue_size=max_queue_size,
            max_tokens=max_tokens,
            over_length=over_length,
            uncertainty=uncertainty,
            sample_rate=sample_rate,
            ensemble=ensemble,
        ),
    )
    if alias or version:
        deployment.target.CopyFrom(version_or_alias(version, alias))
        paths.append("target")
    if no_canary:
        paths.append("canary")  # an empty canary in the mask removes it
    if not paths:
        fail("nothing to change: give at least one option (see --help)", code=2)
    request = sv.UpdateDeploymentRequest(name=name, deployment=deployment, wait_until_ready=wait)
    request.update_mask.paths.extend(paths)
    show_one(ctx, lambda gm: gm.serving.UpdateDeployment(request), deployment_fields, as_json)


@deployments_app.command("delete")
@one_line_errors
def deployments_delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="deployment name"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop serving a deployment: routing stops, in-flight requests finish, its models are freed."""
    confirm(f"delete deployment {name!r}", yes, "clients calling it will get NOT_FOUND")
    with state(ctx).client() as gm:
        gm.serving.DeleteDeployment(sv.DeleteDeploymentRequest(name=name))
    emit_object({"deployment": name, "deleted": True}, want_json(ctx, as_json))


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probability: float
    uncertain: bool | None  # the typed API says; the OIP answer does not carry it
    version: str
    # With --explain: each token's attribution to the label, in text order.
    attributions: tuple[sv.TokenAttribution, ...] = ()
    attribution_delta: float = 0.0


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


def predict_typed(
    gm: Gristmill, deployment: str, texts: list[str], request_id: str = "", *, explain: bool = False, steps: int = 0
) -> list[Prediction]:
    request = sv.PredictRequest(model=deployment, texts=texts, request_id=request_id, explain=explain)
    if explain:
        request.explain_steps = steps
    reply = gm.serving.Predict(request)
    version = f"{reply.registered_model_name} v{reply.model_version}"
    return [
        Prediction(text, p.label, p.top_probability, p.uncertain, version, tuple(p.attributions), p.attribution_delta)
        for text, p in zip(texts, reply.predictions, strict=True)
    ]


def explanation_summary(attributions: tuple[sv.TokenAttribution, ...], top: int = 5) -> str:
    """The tokens that moved the label most, strongest first: ``great +0.412, but -0.051``."""
    strongest = sorted(attributions, key=lambda a: -abs(a.score))[:top]
    return ", ".join(f"{a.token} {a.score:+.3f}" for a in strongest)


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
    explain: bool = typer.Option(
        False, "--explain", help="also say which tokens moved each answer (integrated gradients; up to 16 texts)"
    ),
    explain_steps: int = typer.Option(
        0, "--explain-steps", min=0, max=256, help="integration steps for --explain (0: the server's 32)"
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Classify texts with a deployed model."""
    if any(not t.strip() for t in texts):
        fail("every text must be non-empty", code=2)
    if explain and use_oip:
        fail("--explain needs the typed Predict API: leave out --oip", code=2)
    if explain_steps and not explain:
        fail("--explain-steps needs --explain", code=2)
    json_out = want_json(ctx, as_json)
    with state(ctx).client() as gm:
        if use_oip:
            predictions = predict_oip(gm, deployment, list(texts))
        else:
            predictions = predict_typed(gm, deployment, list(texts), explain=explain, steps=explain_steps)
    rows = []
    for p in predictions:
        row: dict[str, object] = {
            "label": p.label,
            "probability": round(p.probability, 4),
            **({} if p.uncertain is None else {"uncertain": p.uncertain}),
            "model": p.version,
            "text": p.text[:60],
        }
        if explain and json_out:
            row["attributions"] = [
                {"token": a.token, "start": a.start, "end": a.end, "score": a.score} for a in p.attributions
            ]
            row["attribution_delta"] = p.attribution_delta
        elif explain:
            row["explanation"] = explanation_summary(p.attributions)
        rows.append(row)
    emit(rows, json_out)


@one_line_errors
def generate_command(
    ctx: typer.Context,
    deployment: str = typer.Argument(..., help="deployment name (a chat model)"),
    message: str = typer.Argument(..., help="the user's message"),
    system: str = typer.Option("", "--system", help="a system message before it"),
    prompt: bool = typer.Option(False, "--prompt", help="send MESSAGE as a raw prompt, without the chat template"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="new tokens at most (default 256)"),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="0 is greedy (default 1)"),
    top_p: float | None = typer.Option(None, "--top-p", help="nucleus sampling mass in (0, 1]"),
    seed: int | None = typer.Option(None, "--seed", help="same seed, same reply"),
    stop: list[str] = typer.Option([], "--stop", help="end the reply before this text (repeatable)"),
    json_schema: Path | None = typer.Option(None, "--json-schema", help="a JSON Schema file the reply must follow"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate a reply with a deployed chat model, printed as it streams (then the usage, on stderr)."""
    request = sv.GenerateRequest(model=deployment, stop=stop)
    if prompt:
        request.prompt = message
    else:
        turns = [common_pb2.ChatMessage(role="system", content=system)] if system else []
        request.messages.extend([*turns, common_pb2.ChatMessage(role="user", content=message)])
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    schema = read_text_option(json_schema, "--json-schema")
    if schema:
        request.response_format.json_schema = schema
    structured = want_json(ctx, as_json)
    parts: list[str] = []
    last = sv.GenerateResponse()
    with state(ctx).client() as gm:
        for response in gm.serving.Generate(request):
            parts.append(response.text)
            last = response
            if not structured:
                typer.echo(response.text, nl=False)
    reason = enum_name(sv.FinishReason.Name(last.finish_reason), "FINISH_REASON_")
    if structured:
        emit_object(
            {
                "text": "".join(parts),
                "finish_reason": reason,
                "request_id": last.request_id,
                "model_version": f"{last.registered_model_name}/{last.model_version}",
                "prompt_tokens": last.usage.prompt_tokens,
                "completion_tokens": last.usage.completion_tokens,
            },
            True,
        )
        return
    typer.echo("")
    typer.echo(
        f"[{last.registered_model_name} v{last.model_version}, {reason}, {last.usage.prompt_tokens} prompt + "
        f"{last.usage.completion_tokens} completion tokens, request {last.request_id}]",
        err=True,
    )
