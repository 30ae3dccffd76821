"""The Open Inference Protocol v2 (``inference.GRPCInferenceService``), wire-compatible with KServe and Triton
clients. Model names are deployment names; see grpc_predict_v2.proto for tensors and status codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.core.auth import Principal, current_organization, current_principal
from gristmill.core.errors import GristmillError, InvalidArgumentError, NotFoundError, UnavailableError
from gristmill.core.telemetry import current_trace_id
from gristmill.serving import __version__
from gristmill.serving.api import convert, oip_stream
from gristmill.serving.api.servicer import time_left
from gristmill.serving.domain.generation import Generation
from gristmill.serving.domain.model import VersionSelector
from gristmill.serving.domain.service import DeploymentService

log = logging.getLogger(__name__)

SERVER_NAME = "gristmill-serving"

Send = Callable[[oip.ModelStreamInferResponse], None]


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

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: Any
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        # Each request is a reply of its own, run as a task as soon as it is read; the responses of all of them
        # go out in the order their chunks are produced. The stream ends once the client has stopped sending
        # and every reply has ended; a client that goes away cancels them all (their sequences are freed).
        organization, caller = current_organization(), current_principal()
        outbox: asyncio.Queue[oip.ModelStreamInferResponse | None] = asyncio.Queue()
        replies: set[asyncio.Task[None]] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    reply = asyncio.create_task(
                        self._stream_reply(organization, caller, request, context, outbox.put_nowait)
                    )
                    replies.add(reply)
                    reply.add_done_callback(replies.discard)
                await asyncio.gather(*list(replies), return_exceptions=True)
            finally:
                outbox.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await outbox.get()) is not None:
                yield response
            await reader  # a failure reading the requests fails the call
        finally:
            pending = [reader, *replies]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _stream_reply(
        self, organization: str, caller: Principal, request: oip.ModelInferRequest, context: Any, send: Send
    ) -> None:
        """One request of a ModelStreamInfer stream; its failure is a response of its own, never the stream's."""
        generation: Generation | None = None
        try:
            if not request.model_name:
                raise InvalidArgumentError("model_name is required: the name of the deployment")
            pin = _version(request.model_version)
            asked = oip_stream.parse_stream_request(request)
            timeout_s = time_left(context)
            if asked.timeout_s is not None:
                timeout_s = asked.timeout_s if timeout_s is None else min(timeout_s, asked.timeout_s)
            generation = await self._service.generate(
                organization,
                request.model_name,
                messages=asked.messages,
                prompt=asked.prompt,
                max_new_tokens=asked.max_new_tokens,
                sampling=asked.sampling,
                stop=asked.stop,
                pin=pin,
                timeout_s=timeout_s,
                caller=caller,
            )
            if not asked.stream:
                text, last = await generation.collect()
                for response in oip_stream.final_responses(
                    request, generation, text, last, empty_final=asked.empty_final
                ):
                    send(response)
                return
            async for chunk in generation:
                if chunk.finish_reason is not None:
                    for response in oip_stream.final_responses(
                        request, generation, chunk.text, chunk, empty_final=asked.empty_final
                    ):
                        send(response)
                    return
                if chunk.text:
                    send(oip_stream.text_response(request, generation, chunk.text))
            raise AssertionError("the reply ended without a finish reason")
        except GristmillError as exc:
            send(oip_stream.error_response(request, exc.grpc_code, exc.message))
        except Exception:
            trace_id = current_trace_id() or "unknown"
            log.exception("ModelStreamInfer request %r failed (trace id %s)", request.id[:64], trace_id)
            send(oip_stream.error_response(request, grpc.StatusCode.INTERNAL, f"internal error (trace id {trace_id})"))
        finally:
            if generation is not None:
                generation.close()
