"""Publishing logged predictions as ``prediction logged`` events, PII-masked, through the outbox.

``log`` is called on the event loop after a request was answered and must not block it: it only queues the
records with the request's trace context. A writer thread masks the texts (the same ``PiiMasker`` as
labeling), builds the events inside that trace context (so a prediction's trace continues into labeling)
and adds them to the outbox in one transaction per batch (it lets a batch gather for ``linger_s`` first); the
outbox relay publishes them. The queue is bounded: when the database cannot keep up, new records are dropped
and counted, never the requests slowed.
Records still queued when the process dies are lost; they are a sample, not state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from opentelemetry import context as otel_context
from prometheus_client import Counter

from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import EventCatalog, Outbox, OutboxWriter
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.pii import PiiMasker
from gristmill.core.sql import Database
from gristmill.serving.domain.predictions import PredictionRecord

log = logging.getLogger(__name__)


def prediction_logged(record: PredictionRecord, masker: PiiMasker) -> events_pb2.PredictionLogged:
    """The event payload for ``record``; the text is masked here and only here."""
    masked, _ = masker.mask(record.text)
    prediction = record.prediction
    return events_pb2.PredictionLogged(
        registered_model_name=record.registered_model_name,
        organization_id=record.organization_id,
        model_version=record.version,
        deployment_name=record.deployment,
        request_id=record.request_id,
        index_in_request=record.index_in_request,
        masked_text=masked,
        predicted_label=prediction.label,
        predicted_labels=list(prediction.labels),
        probabilities={name: float(p) for name, p in zip(record.label_names, prediction.probabilities, strict=True)},
        uncertain=prediction.uncertain,
        sampled=record.sampled,
        labeling_project_id=record.labeling_project_id,
    )


class OutboxPredictionSink:
    """A ``PredictionSink`` writing to the outbox from a background thread. ``close`` flushes; safe twice."""

    def __init__(
        self,
        database: Database,
        catalog: EventCatalog,
        *,
        source: str = "serving",
        masker: PiiMasker | None = None,
        capacity: int = 10_000,
        batch_size: int = 500,
        linger_s: float = 0.1,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._database = database
        self._events = OutboxWriter(catalog, source)
        self._masker = masker or PiiMasker()
        self._capacity = capacity
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._queue: deque[tuple[PredictionRecord, otel_context.Context]] = deque()
        self._changed = threading.Condition()
        self._writing = 0
        self._stopping = False
        # Callers of ``flush`` waiting: the writer then stops gathering and writes what it has.
        self._flushing = 0
        self.dropped = 0
        self.written = 0
        # Transactions written (each holds one batch).
        self.batches = 0
        self._dropped_counter = (
            Counter(
                "gristmill_serving_prediction_logs_dropped_total",
                "Logged predictions dropped because the writer could not keep up or failed.",
                ["service"],
                registry=metrics.registry,
            )
            if metrics is not None
            else None
        )
        self._service = metrics.service if metrics is not None else source
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def log(self, records: Sequence[PredictionRecord]) -> None:
        context = otel_context.get_current()
        with self._changed:
            if self._stopping or len(self._queue) + len(records) > self._capacity:
                self._drop(len(records))
                return
            self._queue.extend((record, context) for record in records)
            self._changed.notify_all()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._dropped_counter is not None:
            self._dropped_counter.labels(self._service).inc(count)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if not self._queue and self._stopping:
                    return
                # Let a batch gather: one transaction (one commit) per prediction would cost the server a
                # database write per request when traffic is light but mostly uncertain.
                gather_until = time.monotonic() + self._linger_s
                while len(self._queue) < self._batch_size and not (self._stopping or self._flushing):
                    remaining = gather_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_size))]
                self._writing = len(batch)
            try:
                self._write(batch)
                self.written += len(batch)
                self.batches += 1
            except Exception:
                log.exception("could not write %d logged predictions to the outbox; dropping them", len(batch))
                self._drop(len(batch))
            finally:
                with self._changed:
                    self._writing = 0
                    self._changed.notify_all()

    def _write(self, batch: list[tuple[PredictionRecord, otel_context.Context]]) -> None:
        messages = [(prediction_logged(record, self._masker), record, context) for record, context in batch]
        events = []
        for message, record, context in messages:
            # Each event carries the trace of the request that made its prediction.
            token = otel_context.attach(context)
            try:
                events.append(self._events.event(message, key=record.registered_model_name))
            finally:
                otel_context.detach(token)
        with self._database.transaction() as session:
            Outbox.add_many(session, events)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued is written; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
        try:
            return self._wait_written(deadline)
        finally:
            with self._changed:
                self._flushing -= 1

    def _wait_written(self, deadline: float) -> bool:
        with self._changed:
            while self._queue or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout_s)
