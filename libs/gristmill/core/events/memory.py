"""The in-process event bus: embedded mode (all services in one process) and unit tests.

It keeps Kafka's model so that the shared consumer code runs unchanged: each topic is a set of partitioned
logs of raw records (bytes and headers), a key always lands in the same partition, each consumer group has
committed offsets, and a partition is read by at most one consumer of a group at a time (the first one to
ask; it is released when that consumer stops, and the next one resumes from the committed offset).
Nothing is persisted: the logs live as long as the ``MemoryBroker``.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence

from opentelemetry.trace import TracerProvider

from gristmill.core.events.bus import BatchHandler, Consumer, EventBus, Handler, Record, TopicPartition
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.sql import Database


class MemoryBroker:
    """Topic logs and committed offsets, shared by every ``MemoryEventBus`` built on it. Thread-safe."""

    def __init__(self, partitions: int = 3) -> None:
        if partitions < 1:
            raise ValueError("a topic needs at least one partition")
        self.partitions = partitions
        self._changed = threading.Condition()
        self._logs: dict[str, list[list[Record]]] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._owners: dict[tuple[str, str, int], object] = {}

    def _log(self, topic: str) -> list[list[Record]]:
        return self._logs.setdefault(topic, [[] for _ in range(self.partitions)])

    def partition_for(self, key: bytes | None) -> int:
        # A stable hash (unlike hash()), so a key maps to the same partition in every process.
        return zlib.crc32(key) % self.partitions if key else 0

    def append(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Record:
        with self._changed:
            partition = self.partition_for(key)
            log = self._log(topic)[partition]
            record = Record(
                topic=topic,
                partition=partition,
                offset=len(log),
                key=None if key is None else bytes(key),
                value=None if value is None else bytes(value),
                headers=tuple((str(name), bytes(data)) for name, data in headers),
            )
            log.append(record)
            self._changed.notify_all()
            return record

    def records(self, topic: str) -> list[Record]:
        """Every record of ``topic`` (partition by partition, in offset order), for inspection and tests."""
        with self._changed:
            return [record for log in self._logs.get(topic, []) for record in log]

    def committed(self, group_id: str, topic: str, partition: int) -> int:
        with self._changed:
            return self._committed.get((group_id, topic, partition), 0)

    def fetch(
        self,
        owner: object,
        group_id: str,
        topics: Sequence[str],
        positions: dict[TopicPartition, int],
        max_records: int,
        timeout_s: float,
    ) -> list[Record]:
        """Records after ``positions`` in the partitions ``owner`` holds (claiming free ones); waits for data."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._changed:
            while True:
                out: list[Record] = []
                for topic in topics:
                    for partition, log in enumerate(self._log(topic)):
                        slot = (group_id, topic, partition)
                        holder = self._owners.setdefault(slot, owner)
                        if holder is not owner:
                            continue
                        position = positions.setdefault((topic, partition), self._committed.get(slot, 0))
                        taken = log[position : position + max_records - len(out)]
                        out.extend(taken)
                        positions[(topic, partition)] = position + len(taken)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                self._changed.wait(remaining)

    def commit(self, group_id: str, offsets: dict[TopicPartition, int]) -> None:
        with self._changed:
            for (topic, partition), offset in offsets.items():
                self._committed[(group_id, topic, partition)] = offset

    def release(self, owner: object) -> None:
        with self._changed:
            for slot in [slot for slot, holder in self._owners.items() if holder is owner]:
                del self._owners[slot]
            self._changed.notify_all()


class MemoryEventBus(EventBus):
    """An ``EventBus`` over a ``MemoryBroker``; several buses on one broker act like services on one cluster."""

    system = "memory"

    def __init__(
        self,
        broker: MemoryBroker | None = None,
        *,
        database: Database | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: ServiceMetrics | None = None,
        max_poll_records: int = 100,
    ) -> None:
        super().__init__(database=database, tracer_provider=tracer_provider, metrics=metrics)
        self.broker = broker or MemoryBroker()
        self.max_poll_records = max_poll_records

    def publish_record(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        self.broker.append(topic, key, value, headers)

    def _open_consumer(self, topics: tuple[str, ...], group_id: str, handler: Handler | BatchHandler) -> Consumer:
        return MemoryConsumer(self, topics, group_id, handler)


class MemoryConsumer(Consumer):
    def __init__(
        self, bus: MemoryEventBus, topics: tuple[str, ...], group_id: str, handler: Handler | BatchHandler
    ) -> None:
        super().__init__(bus, topics, group_id, handler)
        self._broker = bus.broker
        self._max_records = bus.max_poll_records
        self._positions: dict[TopicPartition, int] = {}

    def _fetch(self, timeout_s: float) -> list[Record]:
        return self._broker.fetch(self, self.group_id, self.topics, self._positions, self._max_records, timeout_s)

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        self._broker.commit(self.group_id, offsets)

    def _rewind(self, offsets: dict[TopicPartition, int]) -> None:
        self._positions.update(offsets)

    def _close_client(self) -> None:
        self._broker.release(self)
