"""``KafkaEventBus.ensure_topics`` leaves replication to the broker: its request names the partition count only, so
kafka-python sends replication factor -1 and the broker's ``default.replication.factor`` applies (1 on the local
single broker, 3 on the three-broker cluster of deploy/cluster/: tests/cluster/test_kafka_cluster.py checks the
topics there). No broker is needed: the admin client is a fake."""

from __future__ import annotations

from typing import Any

import pytest
from kafka import KafkaAdminClient

from gristmill.core.events.kafka import KafkaEventBus
from gristmill.core.settings import KafkaSettings


class FakeAdmin:
    def __init__(self) -> None:
        self.requests: list[dict[str, dict[str, Any]]] = []
        self.closed = False

    def create_topics(self, topics: dict[str, dict[str, Any]], **_options: Any) -> dict[str, Any]:
        self.requests.append(topics)
        return {"topics": [{"name": name, "error_code": 0} for name in topics]}

    def wait_for_topics(self, _topics: list[str], **_options: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    fake = FakeAdmin()
    monkeypatch.setattr(KafkaEventBus, "admin_client", lambda _self: fake)
    return fake


def test_topics_get_the_brokers_default_replication(admin: FakeAdmin) -> None:
    settings = KafkaSettings(bootstrap_servers="10.0.0.1:9092,10.0.0.2:9092,10.0.0.3:9092", topic_partitions=6)
    bus = KafkaEventBus(settings)
    bus.ensure_topics(["gristmill.test.a.v1", "gristmill.test.b.v1"])
    bus.ensure_topics(["gristmill.test.a.v1"])  # known now: not asked for again

    assert admin.requests == [{name: {"num_partitions": 6} for name in ("gristmill.test.a.v1", "gristmill.test.b.v1")}]
    assert admin.closed
    wire = KafkaAdminClient._process_create_topics_input(admin.requests[0])
    assert [(t.name, t.num_partitions, t.replication_factor) for t in wire] == [
        ("gristmill.test.a.v1", 6, -1),
        ("gristmill.test.b.v1", 6, -1),
    ], "replication factor -1: the broker's default.replication.factor"
