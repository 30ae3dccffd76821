"""A gRPC channel with what every SDK call needs: key, deadline, retries, tracing, typed errors."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider

from gristmill.core.addresses import channel_target, split_addresses
from gristmill.core.errors import GristmillError, error_for_status
from gristmill.core.tls import TlsSettings, channel_credentials, client_tls_from_environment, diagnose_handshake

log = logging.getLogger(__name__)

# Larger than gRPC's 4 MiB default: imports stream chunks and exports return whole files.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ClientOptions:
    """How the SDK calls a service. ``timeout_s`` is per attempt; retries apply to UNAVAILABLE only.

    ``tls``: the client certificate, its key and the CA (mTLS). Not given, it comes from ``GRISTMILL_TLS_*``
    (``client_tls_from_environment``: plaintext when ``GRISTMILL_TLS_CERT_FILE`` is unset); ``tls=None``
    is plaintext whatever the environment says. A call refused at the TLS handshake raises
    ``UnavailableError`` whose message says in one line which side refused and why (``diagnose_handshake``).
    """

    api_key: str = ""
    timeout_s: float = 30.0
    max_attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    tls: TlsSettings | None = field(default_factory=client_tls_from_environment)
    tracer_provider: TracerProvider | None = None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


# Says in one line why the channel's target refused a TLS handshake (or we its), or None.
Diagnose = Callable[[], str | None]


class _ErrorTranslatingIterator:
    """A streamed response whose gRPC errors arrive as ``GristmillError``; other attributes pass through."""

    def __init__(self, call: Any, diagnose: Diagnose | None = None) -> None:
        self._call = call
        self._diagnose = diagnose

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise _translate(exc, self._diagnose) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def _translate(exc: grpc.RpcError, diagnose: Diagnose | None = None) -> GristmillError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    trailing: Any = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    details: dict[str, str] = {
        str(k).removeprefix("gristmill-"): str(v) for k, v in (trailing or ()) if str(k).startswith("gristmill-")
    }
    # A server's own UNAVAILABLE carries its message (and often details); a transport failure says only "Socket
    # closed" or "failed to connect": then a refused TLS handshake is told in one line, the status kept.
    if code == grpc.StatusCode.UNAVAILABLE and diagnose is not None and not details:
        line = diagnose()
        if line is not None:
            details["transport"] = message
            message = line
    return error_for_status(code, message, details)


class _SdkInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(
        self,
        options: ClientOptions,
        sleep: Callable[[float], None] = time.sleep,
        *,
        target: str = "",
        service: str = "",
    ) -> None:
        self._options = options
        self._sleep = sleep
        self._target = target
        self._service = service

    def _diagnose(self) -> str | None:
        # Several addresses (round-robin): the first that refuses the handshake says why.
        for address in split_addresses(self._target):
            line = diagnose_handshake(address, self._options.tls, service=self._service)
            if line is not None:
                return line
        return None

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = list(details.metadata or ())
        if self._options.api_key:
            metadata.append(("authorization", f"Bearer {self._options.api_key}"))
        timeout = details.timeout if details.timeout is not None else self._options.timeout_s
        return _CallDetails(
            details.method,
            timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details = self._details(client_call_details)
        delay = self._options.backoff_s
        for attempt in range(1, self._options.max_attempts + 1):
            call = continuation(details, request)
            code = call.code()
            if code == grpc.StatusCode.OK:
                return call
            if code == grpc.StatusCode.UNAVAILABLE and attempt < self._options.max_attempts:
                log.info("%s unavailable (attempt %d): retrying in %.1fs", details.method, attempt, delay)
                self._sleep(delay)
                delay = min(delay * 2, self._options.max_backoff_s)
                continue
            raise _translate(call, self._diagnose)
        raise AssertionError("unreachable")

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return _ErrorTranslatingIterator(continuation(self._details(client_call_details), request), self._diagnose)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        # A request stream cannot be replayed, so these calls are not retried.
        call = continuation(self._details(client_call_details), request_iterator)
        if call.code() != grpc.StatusCode.OK:
            raise _translate(call, self._diagnose)
        return call

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return _ErrorTranslatingIterator(
            continuation(self._details(client_call_details), request_iterator), self._diagnose
        )


def open_channel(target: str, options: ClientOptions, *, service: str = "") -> grpc.Channel:
    """A channel to ``target`` with the SDK's interceptors; ``service`` names it in error messages.

    ``target`` is ``host:port``, or several, ``host1:port,host2:port`` (replicas of one service): then it is one
    channel with gRPC's ``round_robin`` policy over all of them, calls spread across the replicas that are up and
    a replica that stops answering is left out until it is back (the call that was running there fails
    UNAVAILABLE and is retried, like any UNAVAILABLE, on another). Host names are resolved when the channel
    opens. With TLS every replica's certificate must name the first address's host.
    """
    channel_options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    grpc_target, replica_options = channel_target(target)
    channel_options += replica_options
    credentials = channel_credentials(options.tls) if options.tls is not None else None
    if credentials is not None:
        channel = grpc.secure_channel(grpc_target, credentials, options=channel_options)
    else:
        channel = grpc.insecure_channel(grpc_target, options=channel_options)
    if options.tracer_provider is not None:
        # OpenTelemetry's client interceptor speaks its own interceptor API (grpcext), so it wraps the
        # raw channel first; the SDK interceptor goes outside so that each retry is its own span.
        from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

        otel = client_interceptor(tracer_provider=options.tracer_provider)  # type: ignore[no-untyped-call]
        channel = grpcext.intercept_channel(channel, otel)  # type: ignore[no-untyped-call]
    return grpc.intercept_channel(channel, _SdkInterceptor(options, target=target, service=service))
