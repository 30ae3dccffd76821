"""The services the console calls, over gRPC, each call with the signed-in user's key.

One channel per service for the whole process (calls from every user share it); the key travels per call as
``authorization: Bearer <key>`` metadata, so each call is checked and metered as that user's. A service's answer
keeps its status and message (the page shows it); a service that does not answer is UNAVAILABLE, named with its
address.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from gristmill.api.admin.v1 import admin_pb2, admin_pb2_grpc
from gristmill.api.labeling.v1 import labeling_pb2_grpc
from gristmill.api.registry.v1 import registry_pb2_grpc
from gristmill.api.serving.v1 import serving_pb2_grpc
from gristmill.api.training.v1 import training_pb2_grpc
from gristmill.console.api.timing import record_call
from gristmill.core.addresses import channel_target
from gristmill.core.errors import GristmillError, UnavailableError, error_for_status
from gristmill.core.tls import TlsSettings, channel_credentials

R = TypeVar("R")

# Statuses that say the service was not reached, or failed in itself: not an answer about the request.
_NOT_ANSWERS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)

SERVICES = ("labeling", "admin", "training", "registry", "serving")


def _metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _method_name(request: Any) -> str:
    # Every request message is named after its method (NextTaskRequest for NextTask): the stub object does not say.
    return type(request).__name__.removesuffix("Request")


class Services:
    """Async stubs of the services the console reads and writes, and ``call`` to use them as a user."""

    def __init__(self, addresses: Mapping[str, str], *, timeout_s: float, tls: TlsSettings | None = None) -> None:
        """``addresses``: ``host:port`` of labeling, admin, training, registry and serving."""
        missing = sorted(set(SERVICES) - set(addresses))
        if missing:
            raise ValueError(f"no address for {', '.join(missing)}")
        self.addresses = {name: addresses[name] for name in SERVICES}
        self.timeout_s = timeout_s
        self._closing = asyncio.Event()
        # mTLS to the services with the console's own certificate when the mesh has it (GRISTMILL_TLS_*).
        credentials = channel_credentials(tls) if tls is not None else None
        # Channels connect lazily: a service that is down fails only the pages that need it.
        # An address may list a service's replicas: one round-robin channel over them.
        targets = {name: channel_target(address) for name, address in self.addresses.items()}
        self._channels = {
            name: grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
            for name, (target, options) in targets.items()
        }
        self.labeling = labeling_pb2_grpc.LabelingServiceStub(self._channels["labeling"])
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channels["admin"])
        self.training = training_pb2_grpc.TrainingServiceStub(self._channels["training"])
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channels["registry"])
        self.serving = serving_pb2_grpc.ServingServiceStub(self._channels["serving"])

    async def call(self, service: str, method: Callable[..., Awaitable[R]], request: Any, api_key: str) -> R:
        started = time.perf_counter()
        try:
            return await method(request, metadata=_metadata(api_key), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(service, exc) from None
        finally:
            record_call(f"{service}.{_method_name(request)}", (time.perf_counter() - started) * 1000)

    async def stream(self, service: str, method: Callable[..., Any], request: Any, api_key: str) -> AsyncIterator[Any]:
        """A server-streaming call as that user, with no deadline (it lasts as long as a page watches), that ends
        when the stream does or when the console begins to close (an open page must not hold up a shutdown)."""
        call = method(request, metadata=_metadata(api_key))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                await asyncio.wait({read, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    return
                response = read.result()
                if response is grpc.aio.EOF:
                    return
                yield response
        except grpc.aio.AioRpcError as exc:
            raise self._error(service, exc) from None
        finally:
            closing.cancel()
            call.cancel()

    def begin_close(self) -> None:
        """Ends every open stream (their pages' event streams then end), before the HTTP server drains."""
        self._closing.set()

    async def who_am_i(self, api_key: str) -> admin_pb2.WhoAmIResponse:
        return await self.call("admin", self.admin.WhoAmI, admin_pb2.WhoAmIRequest(), api_key)

    def _error(self, service: str, exc: grpc.aio.AioRpcError) -> GristmillError:
        code, details = exc.code(), exc.details() or ""
        if code in _NOT_ANSWERS:
            return UnavailableError(
                f"the {service} service at {self.addresses[service]} did not answer ({code.name.lower()}): {details}"
            )
        return error_for_status(code, details)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
