"""The event envelope: what a record on the bus carries besides its protobuf payload.

A record is ``key`` (the aggregate id, so one aggregate's events stay in order), ``value`` (the serialized
protobuf message) and headers::

    event-id     a UUID; consumers remember it to ignore redeliveries
    event-type   the protobuf full name of the payload, e.g. gristmill.api.events.v1.JobStateChanged
    event-time   when the fact happened, RFC 3339 in UTC
    source       the service that produced it
    traceparent  W3C trace context (tracestate too when there is one)

``Event.from_record`` is the one parser of that format: the consumers, the dead-letter path and the outbox
relay all go through it, and it raises ``MalformedEventError`` naming what is missing or wrong.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar, overload

from google.protobuf.message import DecodeError, Message

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.core.telemetry import inject_headers

M = TypeVar("M", bound=Message)

Headers = tuple[tuple[str, bytes], ...]

HEADER_EVENT_ID = "event-id"
HEADER_EVENT_TYPE = "event-type"
HEADER_EVENT_TIME = "event-time"
HEADER_SOURCE = "source"
TRACE_HEADERS = ("traceparent", "tracestate")
REQUIRED_HEADERS = (HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EVENT_TIME, HEADER_SOURCE)

DEAD_LETTER_SUFFIX = ".dlq"
# gristmill.<domain>.<event>.v<N>; Kafka allows at most 249 characters in a topic name.
_TOPIC = re.compile(r"^gristmill\.[a-z][a-z0-9_-]*\.[a-z][a-z0-9_-]*\.v[1-9][0-9]*$")
_TOPIC_MAX = 249 - len(DEAD_LETTER_SUFFIX)
_PROTO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class MalformedEventError(InvalidArgumentError):
    """A record is not a valid Gristmill event (missing or bad header, undecodable payload).

    Retrying it cannot help, so consumers send it to the dead-letter topic with this message.
    """


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is ``gristmill.<domain>.<event>.v<N>``, else raise ``InvalidArgumentError``."""
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic) or len(topic) > _TOPIC_MAX:
        raise InvalidArgumentError(
            f"topic {str(topic)[:80]!r} is not valid: use gristmill.<domain>.<event>.v<N> with lower-case "
            "letters, digits, '-' or '_' (e.g. gristmill.training.job-state-changed.v1)"
        )
    return topic


def dead_letter_topic(topic: str) -> str:
    """Where records of ``topic`` that cannot be handled go: ``<topic>.dlq``."""
    return validate_topic(topic) + DEAD_LETTER_SUFFIX


def validate_key(key: str) -> str:
    """Record keys are aggregate ids (project, job, model), so the id rules apply."""
    return validate_id(key, what="event key")


def format_event_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds, e.g. ``2026-01-31T12:00:00.000000Z``."""
    if value.tzinfo is None:
        raise InvalidArgumentError("event time must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_event_time(text: str) -> datetime:
    """The inverse of ``format_event_time``; accepts any RFC 3339 offset and returns UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in text.upper():
        raise MalformedEventError(
            f"header {HEADER_EVENT_TIME} {text[:64]!r} is not an RFC 3339 time with an offset "
            "(e.g. 2026-01-31T12:00:00Z)"
        )
    return parsed.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """One fact on the bus. Build it with ``Event.create``; consumers receive it from ``Event.from_record``."""

    event_id: str
    event_type: str
    topic: str
    key: str
    payload: bytes
    event_time: datetime
    source: str
    # W3C trace context of the code that created the event (so the trace continues through the outbox).
    trace_headers: Headers = field(default=())

    @classmethod
    def create(
        cls,
        message: Message,
        *,
        key: str,
        source: str,
        catalog: EventCatalog,
        event_time: datetime | None = None,
    ) -> Event:
        """An event for ``message``, on the topic ``catalog`` registered for its type.

        Captures the current trace context, so call it inside the span of the work that caused the event.
        """
        event_type = message.DESCRIPTOR.full_name
        return cls(
            event_id=str(uuid.uuid4()),
            event_type=event_type,
            topic=catalog.topic_for(type(message)),
            key=validate_key(key),
            payload=message.SerializeToString(deterministic=True),
            event_time=(event_time or datetime.now(UTC)).astimezone(UTC),
            source=validate_id(source, what="event source"),
            trace_headers=tuple(inject_headers()),
        )

    def to_headers(self) -> list[tuple[str, bytes]]:
        """The record headers, in a fixed order: the four event headers, then the trace headers."""
        return [
            (HEADER_EVENT_ID, self.event_id.encode("ascii")),
            (HEADER_EVENT_TYPE, self.event_type.encode("ascii")),
            (HEADER_EVENT_TIME, format_event_time(self.event_time).encode("ascii")),
            (HEADER_SOURCE, self.source.encode("ascii")),
            *((name, value) for name, value in self.trace_headers if name in TRACE_HEADERS),
        ]

    @classmethod
    def from_record(
        cls, topic: str, key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]
    ) -> Event:
        """Parse a record; raise ``MalformedEventError`` naming the first problem found."""
        found: dict[str, str] = {}
        trace: list[tuple[str, bytes]] = []
        for name, raw in headers:
            if name in TRACE_HEADERS:
                trace.append((name, raw))
            if name not in REQUIRED_HEADERS:
                continue
            if name in found:
                raise MalformedEventError(f"header {name} appears more than once")
            try:
                found[name] = bytes(raw).decode("utf-8")
            except (UnicodeDecodeError, TypeError):
                raise MalformedEventError(f"header {name} is not UTF-8 text") from None
        missing = [name for name in REQUIRED_HEADERS if not found.get(name)]
        if missing:
            raise MalformedEventError(f"missing header {', '.join(missing)} (topic {topic})")
        if key is None:
            raise MalformedEventError(f"record on {topic} has no key (events are keyed by aggregate id)")
        try:
            key_text = bytes(key).decode("utf-8")
            validate_key(key_text)
        except (UnicodeDecodeError, InvalidArgumentError) as exc:
            raise MalformedEventError(f"record key is not a valid aggregate id: {exc}") from None
        event_id = found[HEADER_EVENT_ID]
        try:
            canonical = str(uuid.UUID(event_id))
        except ValueError:
            canonical = ""
        if canonical != event_id:
            raise MalformedEventError(
                f"header {HEADER_EVENT_ID} {event_id[:64]!r} is not a UUID in its canonical lower-case form"
            )
        event_type = found[HEADER_EVENT_TYPE]
        if not _PROTO_NAME.fullmatch(event_type):
            raise MalformedEventError(f"header {HEADER_EVENT_TYPE} {event_type[:80]!r} is not a protobuf message name")
        try:
            source = validate_id(found[HEADER_SOURCE], what=f"header {HEADER_SOURCE}")
        except InvalidArgumentError as exc:
            raise MalformedEventError(str(exc)) from None
        return cls(
            event_id=event_id,
            event_type=event_type,
            topic=topic,
            key=key_text,
            payload=bytes(value or b""),
            event_time=parse_event_time(found[HEADER_EVENT_TIME]),
            source=source,
            trace_headers=tuple(trace),
        )


class EventCatalog:
    """Which protobuf message type travels on which topic; one type per topic, one topic per type.

    Each service builds one at start (``catalog.register(JobStateChanged, "gristmill.training.job-state.v1")``)
    and passes it to the code that creates and decodes events.
    """

    def __init__(self) -> None:
        self._topic_by_type: dict[str, str] = {}
        self._type_by_name: dict[str, type[Message]] = {}

    def register(self, message_type: type[Message], topic: str) -> None:
        """Bind ``message_type`` to ``topic``; registering the same pair twice is fine, a conflict is not."""
        name = message_type.DESCRIPTOR.full_name
        validate_topic(topic)
        known = self._topic_by_type.get(name)
        if known is not None and known != topic:
            raise InvalidArgumentError(f"event type {name} is already registered for topic {known}")
        for other, other_topic in self._topic_by_type.items():
            if other_topic == topic and other != name:
                raise InvalidArgumentError(f"topic {topic} already carries {other}; use one message type per topic")
        self._topic_by_type[name] = topic
        self._type_by_name[name] = message_type

    def topic_for(self, message_type: type[Message]) -> str:
        name = message_type.DESCRIPTOR.full_name
        try:
            return self._topic_by_type[name]
        except KeyError:
            raise InvalidArgumentError(f"event type {name} is not registered in the event catalog") from None

    def message_type(self, event_type: str) -> type[Message]:
        try:
            return self._type_by_name[event_type]
        except KeyError:
            raise MalformedEventError(f"unknown event-type {event_type!r}: not registered in the catalog") from None

    @overload
    def decode(self, event: Event) -> Message: ...
    @overload
    def decode(self, event: Event, expected: type[M]) -> M: ...
    def decode(self, event: Event, expected: type[Message] | None = None) -> Message:
        """The payload as its protobuf message; ``MalformedEventError`` when it cannot be decoded."""
        message_type = self.message_type(event.event_type)
        if expected is not None and message_type is not expected:
            raise MalformedEventError(
                f"event {event.event_id} is a {event.event_type}, not a {expected.DESCRIPTOR.full_name}"
            )
        try:
            return message_type.FromString(event.payload)
        except DecodeError as exc:
            raise MalformedEventError(
                f"payload of event {event.event_id} could not be decoded as {event.event_type}: {exc}"
            ) from None

    def topics(self) -> Sequence[str]:
        return sorted(self._topic_by_type.values())
