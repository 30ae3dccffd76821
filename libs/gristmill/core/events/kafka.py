"""The Kafka event bus (kafka-python 3.0.x).

Producer: ``acks=all`` and idempotence (kafka-python's defaults, stated here on purpose); ``publish`` waits
for the broker's acknowledgement, at most ``KafkaSettings.request_timeout_ms``, and raises
``UnavailableError`` otherwise. The delivery timeout equals that wait, so a record reported as failed is
not delivered later behind the caller's back (the outbox relay retries it instead). ``publish_many`` hands
every record of a batch to the producer before it waits for the first, so a batch travels in a few produce
requests instead of one round trip per event (idempotence keeps them in order within a partition).

Consumer: one ``KafkaConsumer`` per ``subscribe`` with auto-commit off; the shared ``Consumer`` code commits
the offsets of exactly the records it settled, after settling them. Its group coordinator is kafka-python's
with one fix (``_PendingJoinCoordinator``): without it a member could stop consuming for good on a fresh
broker. ``membership`` tells the shared watchdog where the member stands.

Topics (and their ``.dlq`` topics) are created on first use with the admin client, so nothing depends on
the broker's auto-create setting. Only their partition count is ours (``KafkaSettings.topic_partitions``): the
replication factor and ``min.insync.replicas`` are the brokers' defaults, so a cluster's topics are replicated as
the cluster is configured (``deploy/local/kafka.sh`` in cluster mode: three replicas, two in sync). A client
bootstraps from any broker of ``bootstrap_servers`` that answers: list them all, so that one broker's death
leaves the producer and consumers a way in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTopicPartition
from opentelemetry.trace import TracerProvider

from gristmill.core.errors import ConfigurationError, UnavailableError
from gristmill.core.events.bus import (
    STABLE,
    BatchHandler,
    Consumer,
    EventBus,
    Handler,
    Membership,
    Record,
    TopicPartition,
)
from gristmill.core.events.envelope import dead_letter_topic
from gristmill.core.metrics import ServiceMetrics
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database

log = logging.getLogger(__name__)


class KafkaEventBus(EventBus):
    """An ``EventBus`` on a Kafka cluster. The producer and the admin client are opened on first use."""

    system = "kafka"
    # Only how often an idle consumer's thread and its client's I/O thread wake up: at 0.2 s the idle stack's five
    # services took ~10 % of a core (eight consumers, ~0.8 % each), at 1 s ~6 %. A kafka-python poll cannot be
    # interrupted, so a consumer's stop waits for it: the service host asks all its consumers to stop at once.
    idle_poll_s = 1.0

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        database: Database | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: ServiceMetrics | None = None,
        max_poll_records: int = 100,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not settings.bootstrap_servers:
            raise ConfigurationError(
                "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS is empty: set it to host:port of a broker "
                "(or use the in-process bus)"
            )
        super().__init__(database=database, tracer_provider=tracer_provider, metrics=metrics)
        self.settings = settings
        self.max_poll_records = max_poll_records
        # Extra KafkaConsumer settings (e.g. shorter session timeouts in tests).
        self.consumer_options = dict(consumer_options or {})
        self._timeout_ms = settings.request_timeout_ms
        self._lock = threading.Lock()
        self._producer: Any = None
        self._known_topics: set[str] = set()
        self._closed = False

    def _unavailable(self, doing: str, exc: BaseException) -> UnavailableError:
        return UnavailableError(
            f"Kafka at {self.settings.bootstrap_servers} could not {doing} within "
            f"{self._timeout_ms / 1000:g}s: {type(exc).__name__}: {exc}"
        )

    def admin_client(self) -> Any:
        """A new admin client; close it after use. A fresh one each time (topics are created once each, groups
        described rarely): a long-lived one does not reconnect on its own after a broker restart."""
        return KafkaAdminClient(
            bootstrap_servers=self.settings.bootstrap_servers,
            client_id=f"{self.settings.client_id}-admin",
            request_timeout_ms=self._timeout_ms,
            bootstrap_timeout_ms=self._timeout_ms,
        )

    def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create the topics that do not exist yet (partitions from the settings); existing ones are left alone."""
        with self._lock:
            missing = sorted(set(topics) - self._known_topics)
            if not missing:
                return
            admin: Any = None
            try:
                admin = self.admin_client()
                result = admin.create_topics(
                    {name: {"num_partitions": self.settings.topic_partitions} for name in missing},
                    timeout_ms=self._timeout_ms,
                    raise_errors=False,
                )
                for topic in result.get("topics", []):
                    code = topic.get("error_code", 0)
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise UnavailableError(
                            f"Kafka refused to create topic {topic.get('name')}: error {code} "
                            f"{topic.get('error_message') or ''}".rstrip()
                        )
                admin.wait_for_topics(missing, timeout_ms=self._timeout_ms)
            except KafkaError as exc:
                raise self._unavailable(f"create topics {', '.join(missing)}", exc) from exc
            finally:
                if admin is not None:
                    _close_quietly(admin, "admin client")
            self._known_topics.update(missing)

    def _get_producer(self) -> Any:
        with self._lock:
            if self._closed:
                raise UnavailableError("the event bus is closed")
            if self._producer is None:
                timeout = self._timeout_ms
                try:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.settings.bootstrap_servers,
                        client_id=self.settings.client_id,
                        acks="all",
                        enable_idempotence=True,
                        linger_ms=0,
                        request_timeout_ms=timeout,
                        delivery_timeout_ms=timeout,
                        max_block_ms=timeout,
                        bootstrap_timeout_ms=timeout,
                        reconnect_backoff_max_ms=1000,
                    )
                except KafkaError as exc:
                    raise self._unavailable("be reached", exc) from exc
            return self._producer

    def publish_record(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        self._send_record(topic, key, value, headers)()

    def _send_record(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Callable[[], None]:
        # Only hands the record to the producer's sender thread, so a batch's records travel together.
        self.ensure_topics([topic])
        producer = self._get_producer()
        try:
            future = producer.send(topic, key=key, value=value, headers=list(headers))
        except KafkaError as exc:
            raise self._unavailable(f"take a record for {topic}", exc) from exc

        def wait() -> None:
            try:
                # The producer fails the record itself after delivery_timeout_ms; the margin only guards a hang.
                future.get(timeout=self._timeout_ms / 1000 + 5)
            except KafkaError as exc:
                raise self._unavailable(f"take a record for {topic}", exc) from exc

        return wait

    def flush(self, timeout_s: float | None = None) -> None:
        with self._lock:
            producer = self._producer
        if producer is not None:
            try:
                producer.flush(timeout=timeout_s)
            except KafkaError as exc:
                raise self._unavailable("flush", exc) from exc

    def _open_consumer(self, topics: tuple[str, ...], group_id: str, handler: Handler | BatchHandler) -> Consumer:
        self.ensure_topics([*topics, *(dead_letter_topic(t) for t in topics)])
        return KafkaBusConsumer(self, topics, group_id, handler)

    def _close_transport(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=self._timeout_ms / 1000)
            except KafkaError:
                log.warning("Kafka producer did not flush before closing", exc_info=True)


class _PendingJoinCoordinator(ConsumerCoordinator):  # type: ignore[misc]
    """kafka-python 3.0.12's consumer coordinator, where a join still in flight counts as needing a rejoin.

    kafka-python runs JoinGroup+SyncGroup as a task and, when ``poll``'s timeout ends first, leaves the task
    running for the next poll to await. The next poll only awaits it if ``need_rejoin()`` is still true. When
    the rejoin was caused by new topic metadata (not by the ``rejoin_needed`` flag), the group leader's own
    assignment step makes ``need_rejoin()`` false while the task is still in flight: no poll ever awaits the
    result, the member stays in REBALANCING with no partitions and heartbeats off, the broker drops it after
    the session timeout, and the consumer reads nothing until it is restarted. That is the stall of the
    networked loop on fresh brokers (there, every group's first join sees a topic without partition metadata
    and must rejoin once the metadata arrives; on a busy machine a join outlasts a poll). Kafka's
    Java client asks ``rejoinNeededOrPending()`` at the same two places; this is that.
    """

    def need_rejoin(self) -> bool:
        return bool(super().need_rejoin()) or getattr(self, "_join_task", None) is not None


class KafkaBusConsumer(Consumer):
    def __init__(
        self, bus: KafkaEventBus, topics: tuple[str, ...], group_id: str, handler: Handler | BatchHandler
    ) -> None:
        super().__init__(bus, topics, group_id, handler)
        self._kafka = bus
        settings = bus.settings
        options: dict[str, Any] = {
            "bootstrap_servers": settings.bootstrap_servers,
            "client_id": f"{settings.client_id}-{group_id}",
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": settings.session_timeout_ms,
            "heartbeat_interval_ms": min(3_000, settings.session_timeout_ms // 3),
            "max_poll_records": bus.max_poll_records,
            # The broker answers a fetch as soon as one record is there (fetch_min_bytes 1), so this bounds only
            # how often an idle consumer asks again: at 100 ms the idle stack's services and broker took ~30 % of
            # a core (11 % the broker), at 500 ms (Kafka's default) ~11 %, at 2 s ~8 % (one idle consumer: 29 ->
            # 16 wake-ups and 0.42 -> 0.20 % of a core; the broker 4.4 -> 2.7 %). With every service on the
            # machine that serves, that idle work was ~0.4 of the ~7 CPU-ms a prediction costs at concurrency 64.
            # The price: partitions a rebalance newly assigns are fetched once the fetch in flight returns (up to
            # this long). Below the request timeout, as kafka-python requires.
            "fetch_max_wait_ms": min(2_000, settings.request_timeout_ms // 2),
            "request_timeout_ms": max(settings.request_timeout_ms, 1_000),
            "bootstrap_timeout_ms": settings.request_timeout_ms,
            "reconnect_backoff_max_ms": 1000,
            # A topic created just before the group formed can show no partition leaders yet, and the group
            # is then assigned nothing until the next metadata refresh (five minutes by default): refresh
            # often, so the consumer rejoins with the topic's partitions within seconds.
            "metadata_max_age_ms": 5_000,
        }
        options.update(bus.consumer_options)
        self._options = options
        # (when, members) of the last group description.
        self._group_size_at: tuple[float, int] | None = None
        self._consumer: Any = self._open_client()

    def _client(self) -> Any:
        """The client, opened again if re-creating it failed (the broker was down then)."""
        if self._consumer is None:
            self._consumer = self._open_client()
        return self._consumer

    def _open_client(self) -> Any:
        try:
            consumer = KafkaConsumer(**self._options)
            coordinator = getattr(consumer, "_coordinator", None)
            if type(coordinator) is ConsumerCoordinator:
                coordinator.__class__ = _PendingJoinCoordinator
            consumer.subscribe(list(self.topics))
        except KafkaError as exc:
            raise self._kafka._unavailable(f"open a consumer for group {self.group_id}", exc) from exc
        return consumer

    def _recreate_client(self) -> None:
        old, self._consumer = self._consumer, None
        if old is not None:
            try:
                old.close(autocommit=False)
            except Exception:  # a broken client must not keep the new one from opening
                log.debug("closing the stalled consumer of group %s failed", self.group_id, exc_info=True)
        self._consumer = self._open_client()

    def membership(self) -> Membership:
        consumer = self._client()
        coordinator = getattr(consumer, "_coordinator", None)
        # kafka-python's MemberState values are '<stable>', '<rebalancing>', '<unjoined>'.
        state = str(getattr(coordinator, "state", "") or "unknown").strip("<>").lower()
        assigned = tuple(sorted((tp.topic, tp.partition) for tp in consumer.assignment()))
        cluster = getattr(consumer, "_client", None)
        known = getattr(cluster, "cluster", None)
        partitions = sum(len((known.partitions_for_topic(t) if known else None) or ()) for t in self.topics)
        membership = Membership(state=state, assigned=assigned, partitions=partitions)
        if state == STABLE and not assigned and partitions:
            membership = replace(membership, others_can_hold=self._group_size() > partitions)
        return membership

    def _group_size(self) -> int:
        """Members of this group (asked of the broker only when this member holds nothing, and then at most once
        per stall bound: an idle member of a group larger than its partitions would otherwise ask every watch)."""
        now = time.monotonic()
        if self._group_size_at is not None and now - self._group_size_at[0] < self.stall_timeout_s:
            return self._group_size_at[1]
        admin: Any = None
        size = 0
        try:
            admin = self._kafka.admin_client()
            groups = admin.describe_groups([self.group_id])
            size = len(groups.get(self.group_id, {}).get("members") or ())
        except KafkaError as exc:
            log.debug("describing group %s failed: %s", self.group_id, exc)
            return 0  # not remembered: ask again at the next watch
        finally:
            if admin is not None:
                _close_quietly(admin, "admin client")
        self._group_size_at = (now, size)
        return size

    def _fetch(self, timeout_s: float) -> list[Record]:
        try:
            batches = self._client().poll(timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise UnavailableError(f"fetching from Kafka failed: {type(exc).__name__}: {exc}") from exc
        return [
            Record(
                topic=r.topic,
                partition=r.partition,
                offset=r.offset,
                key=r.key,
                value=r.value,
                headers=tuple((name, bytes(value or b"")) for name, value in (r.headers or ())),
            )
            for records in batches.values()
            for r in records
        ]

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            self._client().commit(
                {KafkaTopicPartition(t, p): OffsetAndMetadata(offset, "", -1) for (t, p), offset in offsets.items()}
            )
        except KafkaError as exc:
            raise UnavailableError(f"committing offsets to Kafka failed: {type(exc).__name__}: {exc}") from exc

    def _rewind(self, offsets: dict[TopicPartition, int]) -> None:
        if self._consumer is None:
            return  # a new client starts at the committed offsets anyway
        assigned = self._consumer.assignment()
        for (topic, partition), offset in offsets.items():
            tp = KafkaTopicPartition(topic, partition)
            # After a rebalance the partition may be someone else's: they resume from the committed offset.
            if tp in assigned:
                self._consumer.seek(tp, offset)

    def _close_client(self) -> None:
        try:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
        except KafkaError:
            log.warning("closing the Kafka consumer of group %s failed", self.group_id, exc_info=True)


def _close_quietly(client: Any, what: str) -> None:
    try:
        client.close()
    except Exception:  # closing a broken client must not hide the error that matters
        log.debug("closing the Kafka %s failed", what, exc_info=True)
