"""Prediction drift of one served classifier version: its recent predictions against its test split's profile.

A version whose model was published with a prediction profile (``gristmill.core.drift.PROFILE_FILE``, written by
training) keeps the top-probability bin and the predicted label of its last ``window`` predictions, and scores them
with the population stability index per signal (the top probability's bin, the predicted label, the input's
length in tokens). Versions without a profile (models registered before training
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
        self._recent: deque[tuple[int, str, int]] = deque()
        self._bins = [0] * drift.BINS
        self._lengths = [0] * drift.BINS
        self._labels: Counter[str] = Counter()
        self._lock = threading.Lock()

    def observe(self, predictions: Sequence[TextPrediction], input_lengths: Sequence[int] = ()) -> dict[str, float]:
        """Add one request's predictions (and its texts' lengths in tokens, when known); returns the scores (and
        tells the observer)."""
        with self._lock:
            for index, prediction in enumerate(predictions):
                tokens = input_lengths[index] if index < len(input_lengths) else 0
                entry = (
                    drift.top_probability_bin(prediction.top_probability),
                    prediction.label,
                    drift.input_length_bin(tokens) if tokens > 0 else -1,
                )
                self._add(entry, 1)
                self._recent.append(entry)
                if len(self._recent) > self.window:
                    self._add(self._recent.popleft(), -1)
            scores = self._scores()
            count = len(self._recent)
        if self.observer is not None:
            self.observer(self.deployment, self.version, scores, count)
        return scores

    def snapshot(self) -> tuple[dict[str, float], int]:
        """The current scores and how many predictions they are over."""
        with self._lock:
            return self._scores(), len(self._recent)

    def _add(self, entry: tuple[int, str, int], step: int) -> None:
        top, label, length = entry
        self._bins[top] += step
        self._labels[label] += step
        if length >= 0:
            self._lengths[length] += step

    def _scores(self) -> dict[str, float]:
        return self.profile.scores(self._bins, self._labels, self._lengths if any(self._lengths) else ())
