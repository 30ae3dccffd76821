"""Prediction drift of a classifier: how far its recent predictions are from those it made on its test split.

Training writes the test split's profile beside the model (``PROFILE_FILE``): how its top probabilities fall into
``BINS`` equal bins of [0, 1], how often it predicted each label, and how long its inputs were (tokens read, in
``BINS`` bins of log2 of the count). Serving keeps the same distributions over its recent predictions and scores
each against the reference with the population stability index,

    PSI = sum over bins of (actual - expected) * ln(actual / expected)     (shares, each floored at ``FLOOR``),

the usual reading being < 0.1 no shift, 0.1-0.2 a moderate one, > 0.2 (``ALERT_PSI``) a significant one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PROFILE_FILE = "prediction_profile.json"
BINS = 10
ALERT_PSI = 0.2
# An empty bin on either side would make the index infinite: shares below this count as this.
FLOOR = 1e-4
TOP_PROBABILITY = "top_probability"
LABEL = "label"
INPUT_LENGTH = "input_length"
# Input lengths are binned on log2 of the token count, from 1 to 2**LOG2_MAX_TOKENS (512) and beyond.
LOG2_MAX_TOKENS = 9


def top_probability_bin(probability: float) -> int:
    """The bin of a top probability: [0, 0.1) -> 0, ..., [0.9, 1.0] -> 9."""
    return min(max(int(probability * BINS), 0), BINS - 1)


def input_length_bin(tokens: int) -> int:
    """The bin of an input of ``tokens`` tokens: equal steps of log2(tokens) from 1 to 512 tokens."""
    return min(max(int(math.log2(max(tokens, 1)) * BINS / LOG2_MAX_TOKENS), 0), BINS - 1)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """The population stability index of ``actual`` counts against ``expected`` counts (same bins, any scale)."""
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} expected bins against {len(actual)} actual ones")
    expected_total, actual_total = sum(expected), sum(actual)
    if expected_total <= 0 or actual_total <= 0:
        return 0.0
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e_share = max(e / expected_total, FLOOR)
        a_share = max(a / actual_total, FLOOR)
        total += (a_share - e_share) * math.log(a_share / e_share)
    return total


@dataclass(frozen=True)
class PredictionProfile:
    """A classifier's predictions on one split: top-probability bin counts and predicted-label counts."""

    top_probability_counts: tuple[int, ...]
    label_counts: Mapping[str, int]
    input_length_counts: tuple[int, ...] = ()
    split: str = "test"

    @property
    def count(self) -> int:
        return sum(self.top_probability_counts)

    def to_json(self) -> str:
        return json.dumps(
            {
                "split": self.split,
                "bins": BINS,
                "top_probability_counts": list(self.top_probability_counts),
                "label_counts": dict(self.label_counts),
                "input_length_counts": list(self.input_length_counts),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PredictionProfile:
        """The profile, or ValueError naming what is wrong with it."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("bins") != BINS:
            raise ValueError(f"a prediction profile needs bins = {BINS}")
        counts = data.get("top_probability_counts")
        labels = data.get("label_counts")
        if not isinstance(counts, list) or len(counts) != BINS or not all(isinstance(c, int) for c in counts):
            raise ValueError(f"top_probability_counts must be {BINS} integers")
        if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
            raise ValueError("label_counts must map labels to integers")
        lengths = data.get("input_length_counts", [])
        valid = isinstance(lengths, list) and len(lengths) in (0, BINS)
        if not valid or not all(isinstance(c, int) for c in lengths):
            raise ValueError(f"input_length_counts must be {BINS} integers")
        return cls(
            tuple(counts), {str(k): v for k, v in labels.items()}, tuple(lengths), str(data.get("split", "test"))
        )

    def scores(
        self,
        top_probability_counts: Sequence[int],
        label_counts: Mapping[str, int],
        input_length_counts: Sequence[int] = (),
    ) -> dict[str, float]:
        """PSI of recent predictions against this profile, per signal (``TOP_PROBABILITY``, ``LABEL``, and
        ``INPUT_LENGTH`` when both sides have input lengths)."""
        labels = sorted(set(self.label_counts) | set(label_counts))
        scores = {
            TOP_PROBABILITY: psi(self.top_probability_counts, top_probability_counts),
            LABEL: psi([self.label_counts.get(k, 0) for k in labels], [label_counts.get(k, 0) for k in labels]),
        }
        if self.input_length_counts and input_length_counts:
            scores[INPUT_LENGTH] = psi(self.input_length_counts, input_length_counts)
        return scores
