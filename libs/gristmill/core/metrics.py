"""Prometheus metrics for one service, served on a metrics port.

Each service builds one ``ServiceMetrics`` with its own ``CollectorRegistry`` (never the global one, so
several services can live in one process in embedded mode and in tests) and hands it to the gRPC
server, the event consumers and its queues.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The metrics every service exposes; services may register more on ``registry``."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.rpc_requests = Counter(
            "gristmill_rpc_requests_total",
            "gRPC calls handled, by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "gristmill_rpc_latency_seconds",
            "gRPC handling time, by method and status code.",
            ["service", "method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.events_published = Counter(
            "gristmill_events_published_total",
            "Events published to the bus, by topic.",
            ["service", "topic"],
            registry=self.registry,
        )
        self.events_handled = Counter(
            "gristmill_events_handled_total",
            "Events consumed, by topic and outcome (handled, duplicate, dead_lettered).",
            ["service", "topic", "outcome"],
            registry=self.registry,
        )
        self.event_lag = Gauge(
            "gristmill_event_lag_seconds",
            "Seconds between an event's event-time and its handling, last seen per topic.",
            ["service", "topic"],
            registry=self.registry,
        )
        self.outbox_pending = Gauge(
            "gristmill_outbox_pending",
            "Outbox rows written but not yet published.",
            ["service"],
            registry=self.registry,
        )
        self.consumer_assigned = Gauge(
            "gristmill_consumer_assigned_partitions",
            "Partitions a consumer group member holds now, by group.",
            ["service", "group"],
            registry=self.registry,
        )
        self.consumer_rejoins = Counter(
            "gristmill_consumer_rejoins_total",
            "Times a stalled consumer re-created its client and rejoined its group, by group.",
            ["service", "group"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gristmill_queue_depth",
            "Items waiting in an internal queue (batcher, job queue), by queue name.",
            ["service", "queue"],
            registry=self.registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(self.service, method, code).inc()
        self.rpc_latency.labels(self.service, method, code).observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` over HTTP on ``port`` (a daemon thread; lives as long as the process)."""
        start_http_server(port, addr=host, registry=self.registry)
