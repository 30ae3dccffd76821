"""Prediction drift of one served classifier version: its recent predictions against its test split's profile.

A version whose model was published with a prediction profile (``gristmill.core.drift.PROFILE_FILE``, written by
training) keeps the top-probability bin and the predicted label of its last ``window`` predictions, and scores them
with the population stability index per signal. Versions without a profile (models registered before training
wrote one, or from elsewhere) have no drift score.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path

from gristmill.core import drift
from gristmill.serving.domain.predictions import TextPrediction

log = logging.getLogger(__name__)

# Predictions a window holds: enough for a stable index over ten bins, recent enough to follow a shift in minutes.
WINDOW = 1000

# (deployment, version, scores by signal, predictions in the window)
DriftObserver = Callable[[str, int, dict[str, float], int], None]


def read_profile(directory: Path) -> drift.PredictionProfile | None:
    """The profile published with the model in ``directory``; None when it has none (or an unreadable one, logged:
    drift is a monitoring signal, not a reason to refuse a model)."""
    path = directory / drift.PROFILE_FILE
    if not path.is_file():
        return None
    try:
        return drift.PredictionProfile.from_json(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: prediction profile ignored (%s); this version gets no drift score", path, exc)
        return None


class DriftWindow:
    """The last ``window`` predictions of one version, binned, and their drift scores against ``profile``."""

    def __init__(
        self,
        deployment: str,
        version: int,
        profile: drift.PredictionProfile,
        *,
        window: int = WINDOW,
        observer: DriftObserver | None = None,
    ) -> None:
        self.deployment = deployment
        self.version = version
        self.profile = profile
        self.window = window
        self.observer = observer
        self._recent: deque[tuple[int, str]] = deque()
        self._bins = [0] * drift.BINS
        self._labels: Counter[str] = Counter()
        self._lock = threading.Lock()

    def observe(self, predictions: Sequence[TextPrediction]) -> dict[str, float]:
        """Add one request's predictions; returns the scores (and tells the observer)."""
        with self._lock:
            for prediction in predictions:
                entry = (drift.top_probability_bin(prediction.top_probability), prediction.label)
                self._recent.append(entry)
                self._bins[entry[0]] += 1
                self._labels[entry[1]] += 1
                if len(self._recent) > self.window:
                    old_bin, old_label = self._recent.popleft()
                    self._bins[old_bin] -= 1
                    self._labels[old_label] -= 1
            scores = self.profile.scores(self._bins, self._labels)
            count = len(self._recent)
        if self.observer is not None:
            self.observer(self.deployment, self.version, scores, count)
        return scores

    def snapshot(self) -> tuple[dict[str, float], int]:
        """The current scores and how many predictions they are over."""
        with self._lock:
            return self.profile.scores(self._bins, self._labels), len(self._recent)
