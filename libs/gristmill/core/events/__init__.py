"""The event bus: facts that already happened, as protobuf payloads on ``gristmill.<domain>.<event>.v1`` topics.

Delivery guarantees, and what they ask of you:

- **At least once.** A producer writes its event in the same database transaction as the state change
  (``Outbox.add``); ``OutboxRelay`` publishes it afterwards and marks it published only once the bus
  confirmed it. A broker outage delays events and loses none; a crash between publishing and marking
  publishes an event twice.
- **Ordered per key.** Records are keyed by aggregate id (project, job, model); one key's events land in
  one partition and the relay never skips past a failed row, so they arrive in the order written.
- **Duplicates are ignored.** Each consumer group remembers handled ``event-id``s in its service's
  database (``gristmill_handled_events``). The handler gets the session of the transaction that records
  the id: write the state change through it and both commit, or neither does. Side effects outside that
  database (a call, a file) may run again after a crash, so keep them idempotent.
- **Offsets are committed after handling.** A record is committed once it was handled, skipped as a
  duplicate, or dead-lettered, never before.
- **Batches.** ``publish_many`` sends a batch before waiting for it and reports the confirmed prefix (the
  relay marks exactly those rows published). A ``BatchHandler`` gets a fetched batch's new events in one
  transaction; if it raises, the batch is handled event by event, so only a bad event is dead-lettered.
- **Dead letters.** A record that cannot be handled (missing or bad header, undecodable payload, a handler
  exception) goes, bytes and headers unchanged, to ``<topic>.dlq`` with an ``error`` header (one line) and
  ``error-type``, and the consumer moves on. If even that write fails, the consumer stops at the record and
  retries it. A handler that raises ``UnavailableError`` (a dependency is down) is not dead-lettered:
  the consumer rewinds and retries the record after a backoff.
- **Traced.** Records carry W3C ``traceparent``/``tracestate``: ``<topic> publish`` (PRODUCER) continues
  the trace of the code that created the event, ``<topic> process`` (CONSUMER) is its child.

Implementations: ``MemoryEventBus`` (one process: embedded mode and unit tests) and ``KafkaEventBus``
(kafka-python; imported lazily so that the in-process bus does not need Kafka installed). The platform's
message -> topic table is ``gristmill.core.events.topics`` (``platform_catalog()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gristmill.core.events.bus import (
    HEADER_ERROR,
    HEADER_ERROR_TYPE,
    BatchHandler,
    Consumer,
    EventBus,
    EventPublisher,
    EventSubscriber,
    Handler,
    PublishOutcome,
    Record,
)
from gristmill.core.events.envelope import (
    Event,
    EventCatalog,
    MalformedEventError,
    dead_letter_topic,
    validate_topic,
)
from gristmill.core.events.handled import HandledEvent, handled_among, is_handled, mark_handled
from gristmill.core.events.memory import MemoryBroker, MemoryEventBus
from gristmill.core.events.outbox import Outbox, OutboxEvent, OutboxRelay, OutboxWriter

if TYPE_CHECKING:
    from gristmill.core.events.kafka import KafkaEventBus

__all__ = [
    "HEADER_ERROR",
    "HEADER_ERROR_TYPE",
    "BatchHandler",
    "Consumer",
    "Event",
    "EventBus",
    "EventCatalog",
    "EventPublisher",
    "EventSubscriber",
    "HandledEvent",
    "Handler",
    "KafkaEventBus",
    "MalformedEventError",
    "MemoryBroker",
    "MemoryEventBus",
    "Outbox",
    "OutboxEvent",
    "OutboxRelay",
    "OutboxWriter",
    "PublishOutcome",
    "Record",
    "dead_letter_topic",
    "handled_among",
    "is_handled",
    "mark_handled",
    "validate_topic",
]


def __getattr__(name: str) -> Any:
    if name == "KafkaEventBus":
        from gristmill.core.events.kafka import KafkaEventBus

        return KafkaEventBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
