"""The population stability index and the prediction profile training publishes for serving."""

from __future__ import annotations

import math

import pytest

from gristmill.core import drift


def test_psi_is_zero_for_the_same_distribution_at_any_scale_and_grows_with_the_shift() -> None:
    reference = [10, 20, 30, 40]
    assert drift.psi(reference, [1, 2, 3, 4]) == pytest.approx(0.0)
    small = drift.psi(reference, [12, 20, 28, 40])
    large = drift.psi(reference, [40, 30, 20, 10])
    assert 0 < small < 0.1 < drift.ALERT_PSI < large
    # By hand: shares .5/.5 against .9/.1 -> (.9-.5) ln(.9/.5) + (.1-.5) ln(.1/.5).
    assert drift.psi([1, 1], [9, 1]) == pytest.approx(0.4 * math.log(1.8) - 0.4 * math.log(0.2))


def test_an_empty_bin_is_floored_not_infinite_and_no_data_scores_zero() -> None:
    assert math.isfinite(drift.psi([10, 0], [0, 10]))
    assert drift.psi([0, 0], [1, 2]) == 0.0 and drift.psi([1, 2], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="bins"):
        drift.psi([1, 2], [1, 2, 3])


def test_bins_cover_zero_to_one_inclusive() -> None:
    assert [drift.top_probability_bin(p) for p in (0.0, 0.05, 0.1, 0.55, 0.99, 1.0)] == [0, 0, 1, 5, 9, 9]


def test_input_lengths_bin_on_log2_of_the_token_count() -> None:
    assert [drift.input_length_bin(n) for n in (0, 1, 2, 8, 16, 64, 512, 4096)] == [0, 0, 1, 3, 4, 6, 9, 9]


def test_input_lengths_are_scored_only_when_both_sides_have_them() -> None:
    profile = drift.PredictionProfile((5,) * 10, {"a": 50}, input_length_counts=(0, 0, 0, 10, 20, 20, 0, 0, 0, 0))
    assert drift.PredictionProfile.from_json(profile.to_json()) == profile
    longer = profile.scores((5,) * 10, {"a": 50}, (0, 0, 0, 0, 5, 20, 20, 5, 0, 0))
    assert longer[drift.INPUT_LENGTH] > drift.ALERT_PSI
    assert drift.INPUT_LENGTH not in profile.scores((5,) * 10, {"a": 50})
    without = drift.PredictionProfile((5,) * 10, {"a": 50})
    assert drift.INPUT_LENGTH not in without.scores((5,) * 10, {"a": 50}, (1,) * 10)


def test_a_profile_round_trips_and_scores_each_signal() -> None:
    profile = drift.PredictionProfile((0, 0, 0, 0, 0, 2, 3, 5, 10, 30), {"positive": 25, "negative": 25})
    again = drift.PredictionProfile.from_json(profile.to_json())
    assert again == profile and again.count == 50
    scores = again.scores([0, 0, 0, 0, 0, 20, 20, 5, 3, 2], {"positive": 45, "negative": 5, "neutral": 0})
    assert scores[drift.TOP_PROBABILITY] > drift.ALERT_PSI and scores[drift.LABEL] > drift.ALERT_PSI
    same = again.scores([0, 0, 0, 0, 0, 4, 6, 10, 20, 60], {"positive": 50, "negative": 50})
    assert same == {drift.TOP_PROBABILITY: pytest.approx(0.0), drift.LABEL: pytest.approx(0.0)}


@pytest.mark.parametrize(
    "text",
    ['{"bins": 5, "top_probability_counts": [], "label_counts": {}}', '{"bins": 10, "label_counts": {}}', "[]"],
)
def test_a_malformed_profile_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        drift.PredictionProfile.from_json(text)
