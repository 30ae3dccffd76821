"""gRPC server bootstrap shared by every service.

``GrpcServer`` hosts a service's servicers on a ``grpc.aio`` server with, always:

- ``grpc.health.v1`` health (overall and per service) and server reflection;
- interceptors, outermost first: OpenTelemetry tracing, metrics + logging, the error mapper (turns
  ``GristmillError`` into its status and anything unexpected into INTERNAL with a generic message and
  a log line carrying the trace id), and authentication (a hook the service supplies);
- graceful shutdown: ``stop()`` marks health NOT_SERVING, stops accepting, lets in-flight calls finish
  for ``grace`` seconds, then closes. ``stop()`` is safe to call twice; ``serve_until_signal`` wires it
  to SIGTERM/SIGINT.

Servicer methods are ``async def``; domain code that blocks (a database, a file) runs through
``asyncio.to_thread`` so the event loop stays free. Servicers raise ``GristmillError`` subclasses
instead of calling ``context.abort``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast, runtime_checkable

import grpc
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from gristmill.core.errors import GristmillError
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.telemetry import current_trace_id

log = logging.getLogger(__name__)

Behavior = Callable[..., Any]
if TYPE_CHECKING:  # grpc's classes are generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to host: its descriptor (for health and reflection) and how to add it."""

    descriptor: ServiceDescriptor
    add_to_server: Callable[[grpc.aio.Server], None]

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


def reflection_pool(files: Sequence[FileDescriptor]) -> DescriptorPool:
    """A descriptor pool holding ``files`` and everything they import, for server reflection.

    Built per server rather than using protobuf's default pool because the Open Inference Protocol
    file lives in a private pool (see protos/README.md) and reflection must still describe it.
    """
    pool = DescriptorPool()
    added: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        pool.AddSerializedFile(fd.serialized_pb)
        added.add(fd.name)

    for fd in files:
        add(fd)
    return pool


class AuthHook(Protocol):
    """Authenticates a call from its method name and metadata.

    Raise ``UnauthenticatedError`` / ``PermissionDeniedError`` to refuse. The hook runs before the
    servicer, on the thread pool (it may look up a key in a database). What it returns (the caller's
    identity, e.g. ``gristmill.core.auth.Principal``; None is fine) is what ``call_identity()`` gives
    the servicer during that call.
    """

    def __call__(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> object | None: ...


# What ``InlineAuthHook.inline`` answers when it cannot decide without blocking (the hook then runs on the pool).
NOT_INLINE = object()


@runtime_checkable
class InlineAuthHook(AuthHook, Protocol):
    """An ``AuthHook`` that can often decide on the event loop, saving a thread hop per call (a cached key)."""

    def inline(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> object | None:
        """The identity (or a refusal) when known without blocking; ``NOT_INLINE`` otherwise."""
        ...


# The identity the auth hook returned for the call being served. grpc.aio runs each call in a task of its
# own, so a value set for one call is never seen by another.
_CALL_IDENTITY: ContextVar[object | None] = ContextVar("gristmill_call_identity", default=None)


def call_identity() -> object | None:
    """What the auth hook returned for the current call (None without a hook or outside a call)."""
    return _CALL_IDENTITY.get()


# --------------------------------------------------------------------------- handler wrapping
#
# Servicer methods are ``async def`` (domain code that blocks runs through ``asyncio.to_thread``):
# OpenTelemetry's aio interceptor awaits every behavior, so a plain ``def`` handler cannot work
# behind it. Each interceptor below wraps a behavior with an ``around`` function, once for
# unary responses and once for streamed ones.

Around = Callable[[Behavior, bool], Behavior]

_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)


def _wrap_handler(handler: Handler, around: Around) -> Handler:
    """A copy of ``handler`` whose behavior is ``around(behavior, streams_out)``."""
    for attr, factory, streams_out in _KINDS:
        behavior = getattr(handler, attr)
        if behavior is not None:
            wrapped: Handler = factory(
                around(behavior, streams_out),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            return wrapped
    return handler


def _around_each_call(
    before: Callable[[Any, Any], Awaitable[None]] | None,
    after: Callable[[Any, BaseException | None], Awaitable[None] | None] | None = None,
    on_error: Callable[[Any, Exception], Awaitable[None]] | None = None,
) -> Around:
    """Build an ``Around`` from hooks: ``before(request, context)`` runs first; ``on_error`` sees an
    exception the behavior raised (and may abort the call); ``after`` always runs last."""

    def around(behavior: Behavior, streams_out: bool) -> Behavior:
        if streams_out:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                failure: BaseException | None = None
                try:
                    if before is not None:
                        await before(request, context)
                    async for item in behavior(request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                    failure = exc
                    raise
                except Exception as exc:
                    failure = exc
                    if on_error is None:
                        raise
                    await on_error(context, exc)
                finally:
                    if after is not None:
                        result = after(context, failure)
                        if inspect.isawaitable(result):
                            await result

            return stream

        async def unary(request: Any, context: Any) -> Any:
            failure: BaseException | None = None
            try:
                if before is not None:
                    await before(request, context)
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                failure = exc
                raise
            except Exception as exc:
                failure = exc
                if on_error is None:
                    raise
                await on_error(context, exc)
            finally:
                if after is not None:
                    result = after(context, failure)
                    if inspect.isawaitable(result):
                        await result

        return unary

    return around


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns ``GristmillError`` into its status; anything unexpected into a generic INTERNAL."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for attr, _, _ in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None and not (
                inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
            ):
                raise TypeError(
                    f"servicer method {method} must be 'async def' (use asyncio.to_thread for blocking work)"
                )

        async def on_error(context: Any, exc: Exception) -> None:
            if isinstance(exc, GristmillError):
                context.set_trailing_metadata(exc.trailing_metadata())
                await context.abort(exc.grpc_code, exc.message)
            trace_id = current_trace_id() or "unknown"
            log.exception("unexpected error in %s (trace id %s)", method, trace_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (trace id {trace_id})")

        return _wrap_handler(handler, _around_each_call(None, on_error=on_error))


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method and final status, and logs failures in one line."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        started: dict[int, float] = {}

        async def before(_request: Any, context: Any) -> None:
            started[id(context)] = time.perf_counter()

        def after(context: Any, failure: BaseException | None) -> None:
            elapsed = time.perf_counter() - started.pop(id(context), time.perf_counter())
            code = "OK"
            if failure is not None:
                # An abort leaves the real code on the context; anything else ends as INTERNAL/CANCELLED.
                status = context.code()
                if isinstance(status, grpc.StatusCode):
                    code = status.name
                elif isinstance(failure, asyncio.CancelledError):
                    code = "CANCELLED"
                else:
                    code = "INTERNAL"
                log.info("%s -> %s: %s", method, code, context.details() or failure)
            self._metrics.observe_rpc(method, code, elapsed)

        return _wrap_handler(handler, _around_each_call(before, after))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs the service's ``AuthHook`` before the servicer; health and reflection stay open."""

    _OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, hook: AuthHook) -> None:
        self._hook = hook
        # Decided once: an isinstance check against a runtime-checkable protocol walks its members (per call it
        # took ~2 % of the serving event loop's time at concurrency 64).
        self._inline = hook.inline if isinstance(hook, InlineAuthHook) else None

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._OPEN_PREFIXES):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())

        # The check runs inside the wrapped behavior (not here) so that its errors pass through the
        # error mapper, which wraps this interceptor, like any servicer error.
        inline = self._inline

        async def before(_request: Any, _context: Any) -> None:
            identity = inline(method, metadata) if inline is not None else NOT_INLINE
            if identity is NOT_INLINE:
                identity = await asyncio.to_thread(self._hook, method, metadata)
            # Set here, in the call's task: a context change made in the worker thread would not flow back.
            _CALL_IDENTITY.set(identity)

        return _wrap_handler(handler, _around_each_call(before))


# --------------------------------------------------------------------------- the server


class GrpcServer:
    """A service's gRPC server. Use ``async with GrpcServer(...) as server:`` or start/stop."""

    def __init__(
        self,
        service_name: str,
        registrations: Sequence[ServiceRegistration],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics: ServiceMetrics | None = None,
        tracer_provider: TracerProvider | None = None,
        auth_hook: AuthHook | None = None,
        grace_s: float = 10.0,
        server_credentials: grpc.ServerCredentials | None = None,
        component_health: Callable[[], Mapping[str, bool]] | None = None,
        health_interval_s: float = 2.0,
    ) -> None:
        self.service_name = service_name
        self.metrics = metrics or ServiceMetrics(service_name)
        self.grace_s = grace_s
        self._registrations = list(registrations)
        self._address = f"{host}:{port}"
        self._credentials = server_credentials
        self._health = health.aio.HealthServicer()
        self._tracer_provider = tracer_provider
        self._auth_hook = auth_hook
        # Background parts (event consumers) with a health of their own: polled while serving, each published
        # under its own name; the service's overall health stays SERVING (its RPCs still work).
        self._component_health = component_health
        self._health_interval_s = health_interval_s
        self._health_task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.port = 0

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        chain: list[grpc.aio.ServerInterceptor] = [
            aio_server_interceptor(tracer_provider=self._tracer_provider),  # type: ignore[no-untyped-call]
            MetricsInterceptor(self.metrics),
            ErrorMappingInterceptor(),
        ]
        # Innermost, so that the error mapper turns the hook's refusals into statuses.
        if self._auth_hook is not None:
            chain.append(AuthInterceptor(self._auth_hook))
        return chain

    async def start(self) -> int:
        """Bind, start serving, mark every service SERVING; returns the bound port."""
        server = grpc.aio.server(interceptors=self._interceptors())
        for reg in self._registrations:
            reg.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [reg.full_name for reg in self._registrations]
        health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
        files = [reg.descriptor.file for reg in self._registrations]
        pool = reflection_pool([*files, cast(FileDescriptor, health_service.file)])
        reflection.enable_server_reflection(
            [*names, health_service.full_name, reflection.SERVICE_NAME], server, pool=pool
        )
        if self._credentials is not None:
            self.port = server.add_secure_port(self._address, self._credentials)
        else:
            self.port = server.add_insecure_port(self._address)
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {self._address}")
        await server.start()
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING, names)
        if self._component_health is not None:
            await self._publish_component_health()
            self._health_task = asyncio.create_task(self._watch_components(), name=f"{self.service_name}-health")
        log.info("%s serving gRPC on %s", self.service_name, self.address)
        return self.port

    async def _publish_component_health(self) -> None:
        assert self._component_health is not None
        for name, ok in self._component_health().items():
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            await self._health.set(name, status)

    async def _watch_components(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._health_interval_s)
            try:
                await self._publish_component_health()
            except Exception:  # a broken probe must not end the watch
                log.warning("%s: reading component health failed", self.service_name, exc_info=True)

    @property
    def address(self) -> str:
        host = self._address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def _set_health(self, status: int, names: Sequence[str]) -> None:
        for name in ["", *names]:
            await self._health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING → stop accepting → drain in-flight calls for ``grace_s`` → close. Idempotent."""
        if self._server is None or self._stopping:
            await self._stopped.wait() if self._stopping else None
            return
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        grace = self.grace_s if grace_s is None else grace_s
        components = list(self._component_health()) if self._component_health is not None else []
        await self._set_health(
            health_pb2.HealthCheckResponse.NOT_SERVING, [*(r.full_name for r in self._registrations), *components]
        )
        log.info("%s stopping: draining in-flight calls for up to %.1fs", self.service_name, grace)
        await self._server.stop(grace)
        self._stopped.set()
        log.info("%s stopped", self.service_name)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_until_signal(
    server: GrpcServer,
    *,
    on_stop: Sequence[Callable[[], Awaitable[None] | None]] = (),
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Start ``server``, wait for SIGTERM/SIGINT, stop it gracefully, then run ``on_stop`` in reverse.

    ``on_stop`` closes what the service opened after the server (consumers, relays, producers), in
    reverse order of opening.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()
    try:
        await stop_requested.wait()
        log.info("%s received a stop signal", server.service_name)
    finally:
        await server.stop()
        for closer in reversed(on_stop):
            result = closer()
            if inspect.isawaitable(result):
                await result
        for sig in signals:
            loop.remove_signal_handler(sig)
