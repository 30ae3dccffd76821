"""The demo's one trace: a tracer provider for the CLI process, the span tree it saw, and where else the trace
id shows up (every service log line carries ``trace=<id>``).

The SDK is given this provider (``ClientOptions(tracer_provider=...)``), so every call carries the demo's
trace context over gRPC, and the services carry it on through Kafka headers. With
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans are exported over OTLP too (the whole run is one trace in
Jaeger/Tempo, when the services export to the same collector).
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SERVICE_NAMES = ("labeling", "training", "registry", "serving", "admin")


def demo_tracer_provider() -> tuple[TracerProvider, InMemorySpanExporter, str]:
    """A provider that keeps every span in memory (for the span tree) and exports over OTLP when configured;
    returns it, the in-memory exporter and the OTLP endpoint ('' when none)."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "gristmill-cli"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider, memory, endpoint


def _label(span: ReadableSpan) -> str:
    name = span.name
    # gRPC client spans are named after the full method: keep Service/Method.
    if name.startswith("/gristmill.api.") or name.startswith("/inference."):
        service, _, method = name.rpartition("/")
        name = f"{service.rsplit('.', 1)[-1]}/{method}"
    return name


def span_tree(spans: Iterable[ReadableSpan], trace_id: int, *, max_lines: int = 60) -> list[str]:
    """The spans of ``trace_id`` as an indented tree; siblings with the same name are folded into one line
    (``xN``, with their total duration)."""
    mine = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    ids = {s.context.span_id for s in mine if s.context is not None}
    for span in mine:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children[parent].append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        groups: dict[str, list[ReadableSpan]] = defaultdict(list)
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            groups[_label(span)].append(span)
        for label, group in groups.items():
            seconds = sum(((s.end_time or 0) - (s.start_time or 0)) / 1e9 for s in group)
            count = f" x{len(group)}" if len(group) > 1 else ""
            if len(lines) < max_lines:
                lines.append(f"{'  ' * depth}{label}{count}  {seconds:.2f}s")
            for span in group[:1] if len(group) > 1 else group:
                if span.context is not None:
                    walk(span.context.span_id, depth + 1)

    walk(None, 0)
    if len(lines) >= max_lines:
        lines.append("  ...")
    return lines


_LOGGER = re.compile(r" gristmill\.(\w+)\.")


def trace_in_logs(trace_id: str, logs: Mapping[str, Path]) -> dict[str, int]:
    """Log lines carrying ``trace=<trace_id>`` per service. ``logs`` maps a service name to its log file; the
    key ``*`` is a log shared by every service (embedded mode), attributed by the logger name
    (``gristmill.<service>.``)."""
    found: Counter[str] = Counter()
    needle = f"trace={trace_id}"
    for service, path in logs.items():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if needle not in line:
                continue
            if service != "*":
                found[service] += 1
                continue
            match = _LOGGER.search(line)
            if match and match.group(1) in SERVICE_NAMES:
                found[match.group(1)] += 1
    return dict(sorted(found.items()))
