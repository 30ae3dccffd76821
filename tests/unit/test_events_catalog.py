"""The platform topic table in code agrees with events.proto, and every platform event round-trips."""

from __future__ import annotations

import re
from pathlib import Path

from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import Event, validate_topic
from gristmill.core.events.topics import PLATFORM_TOPICS, platform_catalog

EVENTS_PROTO = Path(__file__).resolve().parents[2] / "protos" / "gristmill" / "api" / "events" / "v1" / "events.proto"


def proto_topics() -> dict[str, str]:
    """message name -> topic, from the ``// Topic: <topic>`` line right above each message."""
    text = EVENTS_PROTO.read_text()
    return dict(
        (message, topic) for topic, message in re.findall(r"^// Topic: (\S+).*\n(?://.*\n)*message (\w+)", text, re.M)
    )


def test_code_and_proto_name_the_same_topics() -> None:
    in_code = {message_type.DESCRIPTOR.name: topic for message_type, topic in PLATFORM_TOPICS.items()}
    assert in_code == proto_topics()
    assert len(set(in_code.values())) == len(in_code), "one topic per message type"
    for topic in in_code.values():
        validate_topic(topic)


def test_every_platform_event_round_trips_through_the_catalog() -> None:
    catalog = platform_catalog()
    for message_type in PLATFORM_TOPICS:
        event = Event.create(message_type(), key="agg-1", source="test", catalog=catalog)
        assert event.event_type == f"gristmill.api.events.v1.{message_type.DESCRIPTOR.name}"
        parsed = Event.from_record(event.topic, b"agg-1", event.payload, event.to_headers())
        assert catalog.decode(parsed, message_type) == message_type()
    job = events_pb2.JobStateChanged(job_id="job-7")
    event = Event.create(job, key="job-7", source="training", catalog=catalog)
    assert event.topic == "gristmill.training.job-state-changed.v1"
    assert catalog.decode(event, events_pb2.JobStateChanged).job_id == "job-7"
