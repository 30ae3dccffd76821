"""Agreement of chat ratings (ordinal alpha) and preference answers (pairwise agreement, alpha of choices).

Reference numbers come from Krippendorff's published example and from hand computation shown next to each.
"""

from __future__ import annotations

import pytest

from gristmill.labeling.domain.agreement import (
    GenerativeAgreement,
    ResponseRating,
    generative_agreement,
    krippendorff_alpha,
    krippendorff_alpha_ordinal,
    pairwise_preference_agreement,
    preference_pairs,
)
from gristmill.labeling.domain.model import Response
from gristmill.labeling.tasks import labeling_task

# --------------------------------------------------------------------------- ordinal alpha

# The worked reliability data of Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers,
# 12 units, values 1..5, some missing. Published: nominal alpha 0.743, ordinal 0.815.
NA = None  # a value the observer did not give
KRIPPENDORFF_2011: dict[str, list[int | None]] = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, NA, NA, NA],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NA, 3],
    "C": [NA, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NA],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NA],
}
PUBLISHED_UNITS = [
    {coder: value for coder, values in KRIPPENDORFF_2011.items() if (value := values[unit]) is not None}
    for unit in range(12)
]


def test_ordinal_and_nominal_alpha_of_the_published_example() -> None:
    ordinal = krippendorff_alpha_ordinal(PUBLISHED_UNITS)
    nominal = krippendorff_alpha([list(unit.values()) for unit in PUBLISHED_UNITS])
    assert ordinal is not None and nominal is not None
    assert (round(ordinal, 3), round(nominal, 3)) == (0.815, 0.743)
    # Exact values: the coincidence marginals are n_1..n_5 = 9, 13, 10, 5, 3 (n = 40, unit 12 has one value
    # and is dropped); D_o = 8 disagreeing coincidences give nominal 1 - 39 * 8 / 1216 = 113/152. Ordinal
    # 108577/133160 was computed with exact fractions and agrees with the `krippendorff` PyPI package 0.9.0
    # (0.8153875037548814, and 0.743421052631579 nominal), which is not a dependency.
    assert ordinal == pytest.approx(108577 / 133160, abs=1e-12)
    assert nominal == pytest.approx(113 / 152, abs=1e-12)


def test_ordinal_alpha_hand_computed() -> None:
    # Units (1,1), (3,3), (1,2): n_1 = 3, n_2 = 1, n_3 = 2, n = 6; o_12 = o_21 = 1.
    # delta_12 = (3 + 1 - (3 + 1)/2)^2 = 4, delta_13 = (3 + 1 + 2 - (3 + 2)/2)^2 = 12.25,
    # delta_23 = (1 + 2 - (1 + 2)/2)^2 = 2.25. sum o delta = 2 * 4 = 8;
    # sum_{c != k} n_c n_k delta = 2 * (3*1*4 + 3*2*12.25 + 1*2*2.25) = 180. alpha = 1 - 5 * 8 / 180 = 7/9.
    near = [{"A": 1, "B": 1}, {"A": 3, "B": 3}, {"A": 1, "B": 2}]
    assert krippendorff_alpha_ordinal(near) == pytest.approx(7 / 9)
    # Disagreeing by two ranks instead: n_1 = n_3 = 3, delta_13 = (6 - 3)^2 = 9; sum o delta = 2 * 9 = 18,
    # expected 2 * 3 * 3 * 9 = 162; alpha = 1 - 5 * 18 / 162 = 4/9. The farther apart, the lower.
    far = [{"A": 1, "B": 1}, {"A": 3, "B": 3}, {"A": 1, "B": 3}]
    assert krippendorff_alpha_ordinal(far) == pytest.approx(4 / 9)
    # The nominal alpha scores any miss alike: 1 - 5 * 2 / 22 = 6/11 for the near miss (below the ordinal
    # 7/9), and with only two distinct values, as in the far one, ordinal and nominal alpha coincide.
    assert krippendorff_alpha([list(u.values()) for u in near]) == pytest.approx(6 / 11)
    assert krippendorff_alpha([list(u.values()) for u in far]) == pytest.approx(4 / 9)


def relabel(units: list[dict[str, int]], mapping: dict[int, int]) -> list[dict[str, int]]:
    return [{a: mapping[v] for a, v in unit.items()} for unit in units]


def test_ordinal_alpha_depends_only_on_the_order_of_the_values() -> None:
    ordinal = krippendorff_alpha_ordinal(PUBLISHED_UNITS)
    stretched = relabel(PUBLISHED_UNITS, {1: 10, 2: 20, 3: 21, 4: 500, 5: 1000})
    assert krippendorff_alpha_ordinal(stretched) == pytest.approx(ordinal)
    # Swapping 1 and 5 breaks the order: the ordinal alpha changes, the nominal one does not.
    swapped = relabel(PUBLISHED_UNITS, {1: 5, 2: 2, 3: 3, 4: 4, 5: 1})
    assert krippendorff_alpha_ordinal(swapped) != pytest.approx(ordinal)
    assert krippendorff_alpha([list(u.values()) for u in swapped]) == pytest.approx(113 / 152)


def test_ordinal_alpha_perfect_agreement_and_missing_values() -> None:
    assert krippendorff_alpha_ordinal([{"A": 1, "B": 1}, {"A": 5, "B": 5, "C": 5}]) == pytest.approx(1.0)
    # A unit with one value (the others did not rate it) is not pairable and changes nothing, even with a
    # value no one else used.
    near = [{"A": 1, "B": 1}, {"A": 3, "B": 3}, {"A": 1, "B": 2}]
    assert krippendorff_alpha_ordinal([*near, {"C": 5}, {}]) == pytest.approx(7 / 9)


def test_ordinal_alpha_undefined() -> None:
    assert krippendorff_alpha_ordinal([]) is None
    # A single annotator per unit: nothing pairable.
    assert krippendorff_alpha_ordinal([{"A": 1}, {"A": 4}, {"B": 2}]) is None
    # Everyone gave the same value: no expected disagreement.
    assert krippendorff_alpha_ordinal([{"A": 3, "B": 3}, {"A": 3, "C": 3}]) is None


# --------------------------------------------------------------------------- preference pairs


def test_preference_pairs_of_a_full_ranking() -> None:
    # Best first: 2, then 0, then 1.
    assert preference_pairs((2, 0, 1), False, 3) == {(0, 1): 1, (0, 2): -1, (1, 2): -1}
    # Ranking n - 1 candidates orders the last one too.
    assert preference_pairs((2, 0), False, 3) == preference_pairs((2, 0, 1), False, 3)


def test_preference_pairs_of_a_partial_ranking() -> None:
    # "1 is the best": 1 beats 0 and 2; nothing is said about 0 against 2, so that pair is left out.
    assert preference_pairs((1,), False, 3) == {(0, 1): -1, (1, 2): 1}
    # 3 then 1 above the unranked 0 and 2; 0 against 2 left out.
    assert preference_pairs((3, 1), False, 4) == {
        (0, 1): -1,
        (0, 3): -1,
        (1, 2): 1,
        (1, 3): -1,
        (2, 3): -1,
    }


def test_preference_pairs_of_a_tie() -> None:
    assert preference_pairs((), True, 3) == {(0, 1): 0, (0, 2): 0, (1, 2): 0}
    # As the preference task does, an empty ranking reads as a tie.
    assert preference_pairs((), False, 3) == preference_pairs((), True, 3)
    assert preference_pairs((), True, 1) == {}


@pytest.mark.parametrize(
    ("ranking", "tie", "n"),
    [((0,), True, 2), ((0, 0), False, 2), ((2,), False, 2), ((-1,), False, 2)],
)
def test_preference_pairs_rejects_an_impossible_answer(ranking: tuple[int, ...], tie: bool, n: int) -> None:
    with pytest.raises(ValueError):
        preference_pairs(ranking, tie, n)


# --------------------------------------------------------------------------- pairwise preference agreement


def test_pairwise_preference_agreement_hand_computed() -> None:
    # Item 1 (3 candidates): A "0 is best" = (0,1) +1, (0,2) +1 (nothing on (1,2)); B ranks 0, 1, 2 = +1, +1,
    # +1 → compared on the 2 pairs A covers, 2 alike.
    # Item 2 (2 candidates): A tie 0, B tie 0, C "1 is best" -1 → A-B alike, A-C and B-C not: 1 of 3.
    # Item 3 has one annotator and adds no comparison. Pooled: (2 + 1) / (2 + 3) = 3/5.
    units = [
        {"A": preference_pairs((0,), False, 3), "B": preference_pairs((0, 1, 2), False, 3)},
        {
            "A": preference_pairs((), True, 2),
            "B": preference_pairs((), True, 2),
            "C": preference_pairs((1,), False, 2),
        },
        {"A": preference_pairs((1, 0), False, 2)},
    ]
    assert pairwise_preference_agreement(units) == pytest.approx(3 / 5)


def test_pairwise_preference_agreement_perfect_and_undefined() -> None:
    same = {"A": preference_pairs((1, 0), False, 3), "B": preference_pairs((1, 0, 2), False, 3)}
    assert pairwise_preference_agreement([same]) == pytest.approx(1.0)
    assert pairwise_preference_agreement([]) is None
    assert pairwise_preference_agreement([{"A": preference_pairs((0,), False, 2)}]) is None


def test_choice_alpha_is_the_nominal_alpha_of_the_choice_labels() -> None:
    # The preference task's consensus label of an answer: "candidate-<best>" or "tie".
    labels_of = labeling_task("preference").labels_of
    items = [
        [Response(ranking=(0,)), Response(ranking=(0, 1))],
        [Response(tie=True), Response(tie=True)],
        [Response(ranking=(1, 0)), Response(ranking=(0,))],
    ]
    units = [[labels_of(response)[0] for response in item] for item in items]
    assert units == [["candidate-0", "candidate-0"], ["tie", "tie"], ["candidate-1", "candidate-0"]]
    # n_candidate-0 = 3, n_tie = 2, n_candidate-1 = 1, n = 6; disagreeing coincidences 2 (unit 3);
    # sum_{c != k} n_c n_k = 36 - (9 + 4 + 1) = 22. alpha = 1 - 5 * 2 / 22 = 6/11.
    assert krippendorff_alpha(units) == pytest.approx(6 / 11)


# --------------------------------------------------------------------------- the generative report


def test_generative_agreement_of_chat_and_preference_items() -> None:
    rated = [
        # Chat items: the ratings of the hand-computed 7/9 example; then an item with one rating (B: 0 is
        # "not rated") and one nobody rated, both left out.
        {"A": ResponseRating(rating=1), "B": ResponseRating(rating=1)},
        {"A": ResponseRating(rating=3), "B": ResponseRating(rating=3)},
        {"A": ResponseRating(rating=1), "B": ResponseRating(rating=2)},
        {"A": ResponseRating(rating=4), "B": ResponseRating(rating=0)},
        {"A": ResponseRating(), "B": ResponseRating()},
        # Preference items: the hand-computed 3/5 example (the last with a single answer).
        {
            "A": ResponseRating(ranking=(0,), candidate_count=3),
            "B": ResponseRating(ranking=(0, 1, 2), candidate_count=3),
        },
        {
            "A": ResponseRating(tie=True, candidate_count=2),
            "B": ResponseRating(tie=True, candidate_count=2),
            "C": ResponseRating(ranking=(1,), candidate_count=2),
        },
        {"A": ResponseRating(ranking=(1, 0), candidate_count=2)},
    ]
    report = generative_agreement(rated)
    assert report.rating_alpha == pytest.approx(7 / 9)
    assert report.rated_item_count == 3
    assert report.ranking_pair_agreement == pytest.approx(3 / 5)
    assert report.ranked_item_count == 2


def test_generative_agreement_undefined() -> None:
    assert generative_agreement([]) == GenerativeAgreement(None, 0, None, 0)
    single = [{"A": ResponseRating(rating=5)}, {"B": ResponseRating(tie=True, candidate_count=2)}]
    assert generative_agreement(single) == GenerativeAgreement(None, 0, None, 0)
    # Two ratings, both the same value: one rated item, but alpha is undefined.
    same = [{"A": ResponseRating(rating=4), "B": ResponseRating(rating=4)}]
    assert generative_agreement(same) == GenerativeAgreement(None, 1, None, 0)
