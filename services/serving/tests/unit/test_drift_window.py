"""A version's drift window: its last N predictions, binned, scored against the published profile."""

from __future__ import annotations

from pathlib import Path

from gristmill.core import drift
from gristmill.serving.domain.drift import DriftWindow, read_profile
from gristmill.serving.domain.predictions import TextPrediction, to_prediction

PROFILE = drift.PredictionProfile(
    (0, 0, 0, 0, 0, 0, 0, 0, 0, 100), {"negative": 50, "positive": 50}, (0, 0, 0, 100, 0, 0, 0, 0, 0, 0)
)


def _confident(label: int, n: int) -> list[TextPrediction]:
    probabilities = [0.02, 0.98] if label else [0.98, 0.02]
    return [to_prediction(probabilities, ("negative", "positive"), multi_label=False, uncertainty_threshold=0)] * n


def test_the_window_keeps_the_last_predictions_and_scores_them_against_the_profile() -> None:
    seen: list[tuple[str, int, dict[str, float], int]] = []
    window = DriftWindow("reviews", 3, PROFILE, window=100, observer=lambda *a: seen.append(a))
    # Like the test split: confident, balanced, 8-token inputs.
    scores = window.observe(_confident(0, 50) + _confident(1, 50), [8] * 100)
    assert max(scores.values()) < 0.01 and seen[-1][:2] == ("reviews", 3) and seen[-1][3] == 100
    # Then 100 unsure, one-sided, long ones: the first 100 leave the window, every signal drifts.
    unsure = [to_prediction([0.45, 0.55], ("negative", "positive"), multi_label=False, uncertainty_threshold=0)]
    scores = window.observe(unsure * 100, [200] * 100)
    assert min(scores.values()) > drift.ALERT_PSI and window.snapshot() == (scores, 100)


def test_predictions_without_lengths_score_no_input_length() -> None:
    window = DriftWindow("reviews", 1, PROFILE)
    assert drift.INPUT_LENGTH not in window.observe(_confident(1, 10))


def test_a_model_without_a_readable_profile_has_no_drift(tmp_path: Path) -> None:
    assert read_profile(tmp_path) is None
    (tmp_path / drift.PROFILE_FILE).write_text('{"bins": 3}')
    assert read_profile(tmp_path) is None  # logged and ignored: drift is monitoring, not a reason to refuse
    (tmp_path / drift.PROFILE_FILE).write_text(PROFILE.to_json())
    assert read_profile(tmp_path) == PROFILE
