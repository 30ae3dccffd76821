"""Consumer-group positions on a real broker, for tests that must not time a group's replay of older events."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition


def wait_until_caught_up(bootstrap: str, group_id: str, topic: str, timeout_s: float = 120.0) -> int:
    """Wait until ``group_id`` has committed every partition of ``topic`` up to its end as of now; returns how
    many records it had left then. A new group starts at the topic's beginning: on a broker that earlier tests or runs
    filled, it first works through their events, and a test that times how soon an event of its own is handled
    would time that backlog instead."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        backlog: int | None = None
        while True:
            committed = admin.list_group_offsets({group_id: partitions}).get(group_id, {})
            left = sum(max(0, end - _offset(committed.get(tp))) for tp, end in ends.items())
            backlog = left if backlog is None else backlog
            if left == 0:
                return backlog
            if time.monotonic() > deadline:
                raise AssertionError(f"consumer group {group_id} still had {left} records of {topic} to handle")
            time.sleep(0.1)
    finally:
        consumer.close()
        admin.close()


def _offset(committed: object) -> int:
    offset = getattr(committed, "offset", -1)
    return int(offset) if offset is not None and offset >= 0 else 0
