"""Per-version counters and a sliding latency window (request arrival to answer)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

OK = "ok"
ERROR = "error"
# Refused because of the request itself (bad input, deadline, full queue): not the version's fault.
REJECTED = "rejected"

# (deployment, version, outcome, seconds, texts)
Observer = Callable[[str, int, str, float, int], None]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(min(round(q / 100.0 * len(ordered) + 0.5) - 1, len(ordered) - 1), 0)
    return ordered[rank]


@dataclass
class VersionStats:
    deployment: str
    version: int
    observer: Observer | None = None
    window: int = 2048
    request_count: int = 0
    error_count: int = 0
    rejected_count: int = 0
    _latencies: deque[float] = field(default_factory=deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, outcome: str, seconds: float, texts: int) -> None:
        with self._lock:
            self.request_count += 1
            if outcome == ERROR:
                self.error_count += 1
            elif outcome == REJECTED:
                self.rejected_count += 1
            else:
                self._latencies.append(seconds)
                while len(self._latencies) > self.window:
                    self._latencies.popleft()
        if self.observer is not None:
            self.observer(self.deployment, self.version, outcome, seconds, texts)

    def latency_ms(self) -> tuple[float, float]:
        """(p50, p99) of recent successful requests, in milliseconds."""
        with self._lock:
            values = list(self._latencies)
        return percentile(values, 50) * 1000.0, percentile(values, 99) * 1000.0
