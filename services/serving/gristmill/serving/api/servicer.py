"""The typed API (``gristmill.api.serving.v1.ServingService``): thin, validate → convert → domain → convert."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf import empty_pb2

from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc
from gristmill.core.auth import current_organization, current_principal
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.core.paging import fingerprint, next_page_token, page_request
from gristmill.serving.api import convert
from gristmill.serving.domain.model import organization_or_default
from gristmill.serving.domain.service import DeploymentService


def time_left(context: Any) -> float | None:
    """Seconds until the call's deadline, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)


class ServingServicer(serving_pb2_grpc.ServingServiceServicer):
    def __init__(self, service: DeploymentService) -> None:
        self._service = service

    async def Predict(self, request: serving_pb2.PredictRequest, context: Any) -> serving_pb2.PredictResponse:
        if not request.model:
            raise InvalidArgumentError("model is required: the name of the deployment to predict with")
        pin = convert.selector_from_proto(request.target, what="target") if request.HasField("target") else None
        result, _ = await self._service.predict(
            current_organization(),
            request.model,
            list(request.texts),
            pin=pin,
            request_id=request.request_id,
            timeout_s=time_left(context),
            caller=current_principal(),
            explain=request.explain,
            explain_steps=request.explain_steps,
        )
        return convert.predict_response(result)

    async def Generate(
        self, request: serving_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        if not request.model:
            raise InvalidArgumentError("model is required: the name of the deployment to generate with")
        pin = convert.selector_from_proto(request.target, what="target") if request.HasField("target") else None
        generation = await self._service.generate(
            current_organization(),
            request.model,
            messages=convert.messages_from_proto(request.messages),
            prompt=request.prompt,
            max_new_tokens=request.max_tokens if request.HasField("max_tokens") else None,
            sampling=convert.sampling_from_proto(request),
            stop=list(request.stop),
            pin=pin,
            request_id=request.request_id,
            timeout_s=time_left(context),
            caller=current_principal(),
            response_format=convert.response_format_from_proto(request),
        )
        try:
            async for chunk in generation:
                yield convert.generate_response(chunk, generation)
        finally:
            # The client went away (the call was cancelled) or the reply ended: either way its sequence is freed.
            generation.close()

    async def RecordFeedback(
        self, request: serving_pb2.RecordFeedbackRequest, context: Any
    ) -> serving_pb2.RecordFeedbackResponse:
        record = await self._service.record_feedback(current_organization(), convert.feedback_from_proto(request))
        return serving_pb2.RecordFeedbackResponse(
            request_id=record.request_id,
            registered_model_name=record.registered_model_name,
            model_version=record.version,
        )

    async def CreateDeployment(
        self, request: serving_pb2.CreateDeploymentRequest, context: Any
    ) -> serving_pb2.Deployment:
        if not request.HasField("deployment"):
            raise InvalidArgumentError("deployment is required (at least its registered_model_name)")
        org = current_organization()
        if request.deployment.organization_id and organization_or_default(request.deployment.organization_id) != org:
            raise InvalidArgumentError(
                f"deployment.organization_id {request.deployment.organization_id!r} is not your organisation "
                f"({org!r}); leave it empty"
            )
        now = datetime.now(UTC)
        spec = convert.spec_from_proto(request.deployment, organization_id=org, create_time=now, update_time=now)
        view = await self._service.create(spec, wait_until_ready=request.wait_until_ready, timeout_s=time_left(context))
        return convert.deployment_to_proto(view)

    async def UpdateDeployment(
        self, request: serving_pb2.UpdateDeploymentRequest, context: Any
    ) -> serving_pb2.Deployment:
        validate_id(request.name, what="name")
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgumentError(
                "update_mask is empty; name the fields to change, e.g. 'target', 'canary', 'batching'"
            )
        unknown = sorted(set(paths) - convert.UPDATABLE_PATHS)
        if unknown:
            raise InvalidArgumentError(
                f"update_mask path(s) {', '.join(unknown)} cannot be updated; allowed: "
                f"{', '.join(sorted(convert.UPDATABLE_PATHS))}"
            )
        org = current_organization()
        previous = await self._service.current(org, request.name)
        merged = convert.spec_to_proto(previous)
        # Named fields are replaced whole (an unset "canary" in the request removes the canary, an unset
        # "batching.max_delay_ms" goes back to its default).
        convert.apply_update_mask(request.update_mask, request.deployment, merged)
        spec = convert.spec_from_proto(
            merged, organization_id=org, create_time=previous.create_time, update_time=previous.update_time
        )
        view = await self._service.update(
            spec, previous=previous, wait_until_ready=request.wait_until_ready, timeout_s=time_left(context)
        )
        return convert.deployment_to_proto(view)

    async def GetDeployment(self, request: serving_pb2.GetDeploymentRequest, context: Any) -> serving_pb2.Deployment:
        validate_id(request.name, what="name")
        return convert.deployment_to_proto(await self._service.get(current_organization(), request.name))

    async def ListDeployments(
        self, request: serving_pb2.ListDeploymentsRequest, context: Any
    ) -> serving_pb2.ListDeploymentsResponse:
        query = fingerprint("deployments")
        requested = page_request(request.page.page_size, request.page.page_token, query)
        page = await self._service.list(current_organization(), page_size=requested.size, after=requested.after or "")
        return serving_pb2.ListDeploymentsResponse(
            deployments=[convert.deployment_to_proto(view) for view in page.deployments],
            next_page_token=next_page_token(page.next_after or None, query),
        )

    async def DeleteDeployment(self, request: serving_pb2.DeleteDeploymentRequest, context: Any) -> empty_pb2.Empty:
        validate_id(request.name, what="name")
        await self._service.delete(current_organization(), request.name)
        return empty_pb2.Empty()
