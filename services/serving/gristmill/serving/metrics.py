"""Serving's own Prometheus metrics, on the service's registry: per deployment and version."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gristmill.core.metrics import ServiceMetrics

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._service = metrics.service
        self.requests = Counter(
            "gristmill_serving_requests_total",
            "Prediction requests by deployment, version and outcome (ok, error, rejected).",
            ["service", "deployment", "version", "outcome"],
            registry=metrics.registry,
        )
        self.texts = Counter(
            "gristmill_serving_texts_total",
            "Texts classified, by deployment and version.",
            ["service", "deployment", "version"],
            registry=metrics.registry,
        )
        self.drift_psi = Gauge(
            "gristmill_serving_drift_psi",
            "Population stability index of a version's recent predictions against its test split, per signal "
            "(top_probability: the top probability's bin; label: the predicted label). Above 0.2: a significant shift.",
            ["service", "deployment", "version", "signal"],
            registry=metrics.registry,
        )
        self.drift_window = Gauge(
            "gristmill_serving_drift_window",
            "Predictions the drift index of a version is computed over (its recent window).",
            ["service", "deployment", "version"],
            registry=metrics.registry,
        )
        self.latency = Histogram(
            "gristmill_serving_request_latency_seconds",
            "Prediction latency from arrival to answer, by deployment and version (successful requests).",
            ["service", "deployment", "version"],
            buckets=_BUCKETS,
            registry=metrics.registry,
        )

    def observe(self, deployment: str, version: int, outcome: str, seconds: float, texts: int) -> None:
        labels = (self._service, deployment, str(version))
        self.requests.labels(*labels, outcome).inc()
        if outcome == "ok":
            self.texts.labels(*labels).inc(texts)
            self.latency.labels(*labels).observe(seconds)

    def drift(self, deployment: str, version: int, scores: dict[str, float], window: int) -> None:
        for signal, value in scores.items():
            self.drift_psi.labels(self._service, deployment, str(version), signal).set(value)
        self.drift_window.labels(self._service, deployment, str(version)).set(window)

    def queue_depth(self, queue: str, depth: int) -> None:
        self._metrics.queue_depth.labels(self._service, queue).set(depth)
