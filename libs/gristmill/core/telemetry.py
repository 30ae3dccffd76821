"""OpenTelemetry setup and trace-context propagation.

``setup_tracing`` builds a ``TracerProvider`` for one service: an OTLP exporter when an endpoint is
configured, otherwise none (spans are still created, so context propagates). Tests pass their own
provider with an in-memory exporter instead. The provider is passed explicitly to the gRPC
instrumentation and the event bus; the global provider is only set when asked (it can be set once
per process).

Kafka headers carry W3C ``traceparent``/``tracestate`` so a trace started by a client call continues
through every consumer: ``inject_headers`` / ``extract_context`` convert between the current context
and a list of ``(name, bytes)`` headers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from gristmill.core.settings import TelemetrySettings

log = logging.getLogger(__name__)

_PROPAGATED = ("traceparent", "tracestate")


def setup_tracing(
    service: str, settings: TelemetrySettings | None = None, *, set_global: bool = False
) -> TracerProvider:
    """A tracer provider for ``service``; exports over OTLP only when an endpoint is configured."""
    settings = settings or TelemetrySettings()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name or service}))
    if settings.exporter_otlp_endpoint:
        # Imported here: the exporter is an optional extra (gristmill-libs[otlp]).
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.exporter_otlp_endpoint)))
        log.info("exporting traces over OTLP to %s", settings.exporter_otlp_endpoint)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def inject_headers(ctx: otel_context.Context | None = None) -> list[tuple[str, bytes]]:
    """The W3C trace headers for ``ctx`` (default: the current context), as Kafka-style headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return [(k, v.encode("ascii")) for k, v in carrier.items() if k in _PROPAGATED]


def extract_context(headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes]) -> otel_context.Context:
    """The trace context carried by ``headers`` (empty context when there is none)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    carrier = {k: v.decode("ascii", "replace") for k, v in items if k in _PROPAGATED}
    return propagate.extract(carrier)


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or '' outside a span (for log lines)."""
    span_ctx = trace.get_current_span().get_span_context()
    return format(span_ctx.trace_id, "032x") if span_ctx.is_valid else ""
