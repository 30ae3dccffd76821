"""The Open Inference Protocol v2 (``inference.GRPCInferenceService``), wire-compatible with KServe and Triton
clients. Model names are deployment names; see grpc_predict_v2.proto for tensors and status codes."""

from __future__ import annotations

from typing import Any

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.core.auth import current_organization, current_principal
from gristmill.core.errors import InvalidArgumentError, NotFoundError, UnavailableError
from gristmill.serving import __version__
from gristmill.serving.api import convert
from gristmill.serving.api.servicer import time_left
from gristmill.serving.domain.model import VersionSelector
from gristmill.serving.domain.service import DeploymentService

SERVER_NAME = "gristmill-serving"


def _version(text: str) -> VersionSelector | None:
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgumentError(
            f"model_version {text[:32]!r} is not a version number; leave it empty to use the deployment's routing"
        )
    return VersionSelector.of_version(int(text))


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: DeploymentService) -> None:
        self._service = service
        self._manager = service.manager

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._manager.all_ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        org = current_organization()
        if not self._manager.has(org, request.name):
            raise NotFoundError(f"model {request.name!r} is not deployed here")
        version = request.version
        if version and not version.isdigit():
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(
            ready=self._manager.is_ready(org, request.name, int(version) if version else None)
        )

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Any) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Any) -> oip.ModelMetadataResponse:
        org = current_organization()
        pin = _version(request.version)
        loaded = self._manager.loaded_versions(org, request.name)
        if not loaded:
            raise UnavailableError(f"model {request.name!r} has no ready version yet; retry later")
        chosen = self._manager.route(org, request.name, pin) if pin is not None else loaded[0]
        return convert.model_metadata(
            request.name, sorted(v.version for v in loaded), chosen.resolved, len(chosen.labels)
        )

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any) -> oip.ModelInferResponse:
        if not request.model_name:
            raise InvalidArgumentError("model_name is required: the name of the deployment")
        org = current_organization()
        pin = _version(request.model_version)
        self._service.require(org, request.model_name)
        texts = convert.texts_from_infer_request(request)
        outputs = convert.requested_outputs(request)
        result, _ = await self._service.predict(
            org,
            request.model_name,
            texts,
            pin=pin,
            request_id=request.id,
            timeout_s=time_left(context),
            caller=current_principal(),
        )
        return convert.infer_response(request, result, outputs)
