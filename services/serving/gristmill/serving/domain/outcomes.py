"""How replies ended, per version of a deployment: the counts the registry's online gate compares error rates on.

Counted when a reply ends (a done hook, on the event loop) and flushed as ``GenerationOutcomes`` events every few
seconds and at shutdown (a worker thread). A flush that fails puts its counts back, so they go with the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class OutcomeKey:
    organization_id: str
    registered_model_name: str
    version: int
    deployment: str


@dataclass(frozen=True)
class Outcomes:
    succeeded: int = 0
    failed: int = 0

    def __add__(self, other: Outcomes) -> Outcomes:
        return Outcomes(self.succeeded + other.succeeded, self.failed + other.failed)


class OutcomePublisher(Protocol):
    def publish_outcomes(self, counts: Mapping[OutcomeKey, Outcomes]) -> None:
        """Write one event per key, durably (in the outbox when this returns); blocks: call it off the loop."""
        ...


class OutcomeCounter:
    """Replies per (deployment, version) since the last flush; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[OutcomeKey, Outcomes] = {}

    def count(self, key: OutcomeKey, *, failed: bool) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, Outcomes()) + Outcomes(int(not failed), int(failed))

    def flush(self, publisher: OutcomePublisher) -> int:
        """Publish and reset the counts; returns how many keys were published. On failure nothing is lost."""
        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return 0
        try:
            publisher.publish_outcomes(counts)
        except BaseException:
            with self._lock:
                for key, outcomes in counts.items():
                    self._counts[key] = self._counts.get(key, Outcomes()) + outcomes
            raise
        return len(counts)
