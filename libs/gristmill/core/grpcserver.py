"""gRPC server bootstrap shared by every service.

``GrpcServer`` hosts a service's servicers on a ``grpc.aio`` server with, always:

- ``grpc.health.v1`` health (overall and per service) and server reflection;
- interceptors, outermost first: OpenTelemetry tracing, metrics + logging, authentication (a hook the
  service supplies), and the error mapper that turns ``GristmillError`` into its status and anything
  unexpected into INTERNAL with a generic message and a log line carrying the trace id;
- graceful shutdown: ``stop()`` marks health NOT_SERVING, stops accepting, lets in-flight calls finish
  for ``grace`` seconds, then closes. ``stop()`` is safe to call twice; ``serve_until_signal`` wires it
  to SIGTERM/SIGINT.

Servicer methods may be ``async def`` (run on the event loop) or plain ``def`` (run on a thread pool,
for domain code that blocks on a database); the interceptors keep each kind as it is.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from gristmill.core.errors import GristmillError
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.telemetry import current_trace_id

log = logging.getLogger(__name__)

Behavior = Callable[..., Any]
Handler = grpc.RpcMethodHandler[Any, Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to host: its full name (for health and reflection) and how to add it."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]


class AuthHook(Protocol):
    """Authenticates a call from its method name and metadata.

    Raise ``UnauthenticatedError`` / ``PermissionDeniedError`` to refuse. The hook runs before the
    servicer, on the thread pool (it may look up a key in a database).
    """

    def __call__(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None: ...


# --------------------------------------------------------------------------- handler wrapping


def _wrap_handler(
    handler: Handler,
    around: Callable[[Behavior, bool, bool], Behavior],
) -> Handler | None:
    """A copy of ``handler`` whose behavior is ``around(behavior, is_async, streams_out)``."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attr, factory, streams_out in kinds:
        behavior = getattr(handler, attr)
        if behavior is None:
            continue
        is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        wrapped = around(behavior, is_async, streams_out)
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _status_of(exc: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with when it raised ``exc`` (None = success)."""
    if exc is None:
        return grpc.StatusCode.OK, ""
    if isinstance(exc, GristmillError):
        return exc.grpc_code, exc.message
    return grpc.StatusCode.INTERNAL, ""


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns ``GristmillError`` into its status; anything unexpected into a generic INTERNAL."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return _wrap_handler(handler, lambda b, a, s: _map_errors(b, a, s, method))


def _abort_args(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    if isinstance(exc, GristmillError):
        metadata = tuple((f"gristmill-{k.lower()}", v) for k, v in exc.details.items())
        return exc.grpc_code, exc.message, metadata
    trace_id = current_trace_id()
    log.exception("unexpected error in %s (trace id %s)", method, trace_id or "-")
    return grpc.StatusCode.INTERNAL, f"internal error (trace id {trace_id or 'unknown'})", ()


def _map_errors(behavior: Behavior, is_async: bool, streams_out: bool, method: str) -> Behavior:
    passthrough = (grpc.aio.AbortError, asyncio.CancelledError)
    if is_async and streams_out:

        async def async_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except passthrough:
                raise
            except Exception as exc:
                code, message, md = _abort_args(exc, method)
                await context.abort(code, message, md)

        return async_stream
    if is_async:

        async def async_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except passthrough:
                raise
            except Exception as exc:
                code, message, md = _abort_args(exc, method)
                await context.abort(code, message, md)

        return async_unary
    if streams_out:

        def sync_stream(request: Any, context: Any) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except passthrough:
                raise
            except Exception as exc:
                code, message, md = _abort_args(exc, method)
                context.set_trailing_metadata(md)
                context.abort(code, message)

        return sync_stream

    def sync_unary(request: Any, context: Any) -> Any:
        try:
            return behavior(request, context)
        except passthrough:
            raise
        except Exception as exc:
            code, message, md = _abort_args(exc, method)
            context.set_trailing_metadata(md)
            context.abort(code, message)

    return sync_unary


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method and final status, and logs failures in one line."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return _wrap_handler(handler, lambda b, a, s: _observe(b, a, s, method, self._metrics))


def _observe(behavior: Behavior, is_async: bool, streams_out: bool, method: str, metrics: ServiceMetrics) -> Behavior:
    if is_async and streams_out:

        async def async_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started, exc = time.perf_counter(), None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                exc = e
                raise
            finally:
                _record_with_context(metrics, method, started, exc, context)

        return async_stream
    if is_async:

        async def async_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started, exc = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                _record_with_context(metrics, method, started, exc, context)

        return async_unary
    if streams_out:

        def sync_stream(request: Any, context: Any) -> Iterator[Any]:
            started, exc = time.perf_counter(), None
            try:
                yield from behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                _record_with_context(metrics, method, started, exc, context)

        return sync_stream

    def sync_unary(request: Any, context: Any) -> Any:
        started, exc = time.perf_counter(), None
        try:
            return behavior(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            _record_with_context(metrics, method, started, exc, context)

    return sync_unary


def _record_with_context(
    metrics: ServiceMetrics, method: str, started: float, exc: BaseException | None, context: Any
) -> None:
    code_name = "OK"
    if exc is not None:
        # An abort (from the error mapper or the servicer) leaves the real code on the context.
        code = context.code() if hasattr(context, "code") else None
        code_name = code.name if isinstance(code, grpc.StatusCode) else _status_of(exc)[0].name
        if code_name != "OK":
            log.info("%s -> %s: %s", method, code_name, context.details() if hasattr(context, "details") else exc)
    metrics.observe_rpc(method, code_name, time.perf_counter() - started)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs the service's ``AuthHook`` before the servicer; health and reflection stay open."""

    _OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, hook: AuthHook) -> None:
        self._hook = hook

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        if method.startswith(self._OPEN_PREFIXES):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())

        def around(behavior: Behavior, is_async: bool, streams_out: bool) -> Behavior:
            # The hook's errors must reach the error mapper, which sits inside this interceptor, so
            # the check runs as part of the wrapped behavior rather than here.
            if is_async and streams_out:

                async def astream(request: Any, context: Any) -> AsyncIterator[Any]:
                    await asyncio.to_thread(self._hook, method, metadata)
                    async for item in behavior(request, context):
                        yield item

                return astream
            if is_async:

                async def aunary(request: Any, context: Any) -> Any:
                    await asyncio.to_thread(self._hook, method, metadata)
                    return await behavior(request, context)

                return aunary
            if streams_out:

                def sstream(request: Any, context: Any) -> Iterator[Any]:
                    self._hook(method, metadata)
                    yield from behavior(request, context)

                return sstream

            def sunary(request: Any, context: Any) -> Any:
                self._hook(method, metadata)
                return behavior(request, context)

            return sunary

        return _wrap_handler(handler, around)


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
        max_workers: int = 16,
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.service_name = service_name
        self.metrics = metrics or ServiceMetrics(service_name)
        self.grace_s = grace_s
        self._registrations = list(registrations)
        self._address = f"{host}:{port}"
        self._credentials = server_credentials
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{service_name}-rpc")
        self._health = health.aio.HealthServicer()
        self._tracer_provider = tracer_provider
        self._auth_hook = auth_hook
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.port = 0

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        chain: list[grpc.aio.ServerInterceptor] = [
            aio_server_interceptor(tracer_provider=self._tracer_provider),  # type: ignore[no-untyped-call]
            MetricsInterceptor(self.metrics),
        ]
        if self._auth_hook is not None:
            chain.append(AuthInterceptor(self._auth_hook))
        chain.append(ErrorMappingInterceptor())
        return chain

    async def start(self) -> int:
        """Bind, start serving, mark every service SERVING; returns the bound port."""
        server = grpc.aio.server(migration_thread_pool=self._pool, interceptors=self._interceptors())
        for reg in self._registrations:
            reg.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [reg.full_name for reg in self._registrations]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
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
        log.info("%s serving gRPC on %s", self.service_name, self.address)
        return self.port

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
        grace = self.grace_s if grace_s is None else grace_s
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING, [r.full_name for r in self._registrations])
        log.info("%s stopping: draining in-flight calls for up to %.1fs", self.service_name, grace)
        await self._server.stop(grace)
        self._pool.shutdown(wait=False, cancel_futures=True)
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
