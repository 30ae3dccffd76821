"""Inter-annotator agreement: Cohen's kappa, Fleiss' kappa, Krippendorff's alpha (nominal and ordinal),
pairwise preference agreement, confusion.

Inputs are plain values: a "unit" is one item's ratings, ``{annotator_id: value}``. For single-label
projects a value is the label; for multi-label projects each label is scored as its own binary
decision ("chosen" or not) and the statistics are averaged over the labels where they are defined.
Generative projects add the ordinal alpha of chat ratings (1..5) and, for preference items, how often two
annotators order a pair of candidates alike; alpha over the chosen candidate is the nominal alpha of the
choice labels ("candidate-<i>" or "tie"): ``agreement_report`` given those labels, nothing new.
A statistic that is undefined for the data (no common item, chance agreement of 1) is ``None``.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from gristmill.labeling.domain.model import (
    AgreementReport,
    AnnotatorAgreement,
    ConfusionMatrix,
    PairwiseAgreement,
)

Value = Hashable
Unit = Mapping[str, Value]
V = TypeVar("V", bound=Hashable)
# A candidate pair (i, j), i < j, of a preference item, and +1 (i preferred), -1 (j preferred) or 0 (tied).
CandidatePair = tuple[int, int]


def cohen_kappa(pairs: Sequence[tuple[Value, Value]]) -> float | None:
    """Cohen's kappa of two raters over the items both rated: (p_o - p_e) / (1 - p_e)."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(1 for a, b in pairs if a == b) / n
    count_a = Counter(a for a, _ in pairs)
    count_b = Counter(b for _, b in pairs)
    expected = sum(count_a[k] * count_b.get(k, 0) for k in count_a) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def fleiss_kappa(units: Sequence[Sequence[Value]]) -> float | None:
    """Fleiss' kappa over units with at least two ratings each (the number of raters may vary per unit).

    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P = mean P_i; p_j = share of all ratings in category j,
    P_e = sum_j p_j^2; kappa = (P - P_e) / (1 - P_e).
    """
    rated = [unit for unit in units if len(unit) >= 2]
    if not rated:
        return None
    totals: Counter[Value] = Counter()
    p_sum = 0.0
    for unit in rated:
        counts = Counter(unit)
        n_i = len(unit)
        p_sum += (sum(c * c for c in counts.values()) - n_i) / (n_i * (n_i - 1))
        totals.update(counts)
    p_bar = p_sum / len(rated)
    all_ratings = sum(totals.values())
    p_e = sum((c / all_ratings) ** 2 for c in totals.values())
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def krippendorff_alpha(units: Sequence[Sequence[Value]]) -> float | None:
    """Nominal Krippendorff's alpha: 1 - D_o / D_e from the coincidence matrix (units with < 2 values ignored).

    o_ck = sum over units of (pairs of values c, k from different raters) / (m_u - 1); n_c = sum_k o_ck;
    alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k.
    """
    observed, marginals = _coincidences(units)
    return _alpha(observed, marginals, lambda c, k: 1.0)


def krippendorff_alpha_ordinal(units: Sequence[Mapping[str, int]]) -> float | None:
    """Krippendorff's alpha for ordinal values (e.g. ratings 1..5), units with < 2 values ignored.

    As the nominal alpha, with the disagreement of values c <= k weighted by how many values lie between them:
    delta_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2, n_g the marginal count of value g. Only the order of
    the values matters, not their distance. ``None`` when no unit is pairable or all values are equal.
    """
    observed, marginals = _coincidences([list(unit.values()) for unit in units])
    # Ranks from the marginals: below[v] = how many values are smaller than v.
    below: dict[int, int] = {}
    running = 0
    for value in sorted(marginals):
        below[value] = running
        running += marginals[value]

    def delta(c: int, k: int) -> float:
        low, high = min(c, k), max(c, k)
        between = below[high] + marginals[high] - below[low]  # sum of n_g for low <= g <= high
        return (between - (marginals[low] + marginals[high]) / 2) ** 2

    return _alpha(observed, marginals, delta)


def _coincidences(units: Iterable[Sequence[V]]) -> tuple[dict[tuple[V, V], float], Counter[V]]:
    """The off-diagonal coincidences o_ck (c != k) and the marginals n_c of the units with >= 2 values."""
    observed: defaultdict[tuple[V, V], float] = defaultdict(float)
    marginals: Counter[V] = Counter()
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        counts = Counter(unit)
        # Every value pairs with the m - 1 others, each pair weighted 1 / (m - 1): it adds 1 to n_c.
        marginals.update(counts)
        for (c, count_c), (k, count_k) in itertools.permutations(counts.items(), 2):
            observed[c, k] += count_c * count_k / (m - 1)
    return observed, marginals


def _alpha(
    observed: Mapping[tuple[V, V], float], marginals: Mapping[V, int], delta: Callable[[V, V], float]
) -> float | None:
    """alpha = 1 - (n - 1) * sum_{c != k} o_ck delta_ck / sum_{c != k} n_c n_k delta_ck (None if D_e = 0)."""
    n = sum(marginals.values())
    expected = sum(marginals[c] * marginals[k] * delta(c, k) for c, k in itertools.permutations(marginals, 2))
    if n < 2 or expected == 0:
        return None
    disagreement = sum(o * delta(c, k) for (c, k), o in observed.items())
    return 1.0 - (n - 1) * disagreement / expected


def preference_pairs(ranking: tuple[int, ...], tie: bool, n: int) -> dict[CandidatePair, int]:
    """What one preference answer says about every candidate pair (i, j), i < j, of an item with n candidates.

    +1: i is preferred to j, -1: j to i, 0: tied. A ranking lists candidates best first and puts them above
    every unranked one; it says nothing about two unranked candidates, so those pairs are left out (a
    choice of the best among three is not a claim that the other two are equal, and must not disagree with
    an annotator who ordered them). A tie (or an empty ranking, which the preference task also reads as a
    tie) is a claim about every pair: each is 0.
    """
    if tie and ranking:
        raise ValueError("a preference is a ranking or a tie, not both")
    if len(set(ranking)) != len(ranking) or any(not 0 <= index < n for index in ranking):
        raise ValueError(f"ranking {ranking} is not a list of distinct candidates 0..{n - 1}")
    # Position in the ranking; every unranked candidate shares the position after the last ranked one.
    position = {candidate: place for place, candidate in enumerate(ranking)}
    rank = [position.get(candidate, len(ranking)) for candidate in range(n)]
    unranked = len(ranking)
    return {
        (i, j): _sign(rank[j] - rank[i])
        for i, j in itertools.combinations(range(n), 2)
        if not ranking or rank[i] < unranked or rank[j] < unranked
    }


def pairwise_preference_agreement(units: Sequence[Mapping[str, Mapping[CandidatePair, int]]]) -> float | None:
    """Share of comparisons on which two annotators order a candidate pair alike (ties count as an order).

    A unit is one item's ``{annotator_id: preference_pairs(...)}``; every pair of annotators of an item is
    compared on every candidate pair both answers cover, and the comparisons of all items are pooled.
    ``None`` when there is no comparison (no item with two annotators).
    """
    agreeing = compared = 0
    for unit in units:
        for first, second in itertools.combinations(unit.values(), 2):
            for pair in first.keys() & second.keys():
                compared += 1
                agreeing += _sign(first[pair]) == _sign(second[pair])
    return agreeing / compared if compared else None


@dataclass(frozen=True)
class ResponseRating:
    """The parts of one generative annotation the agreement statistics use.

    ``rating`` 1..5 for chat (0: not rated); ``ranking`` (best first) or ``tie`` for preference, over the
    item's ``candidate_count`` candidates (an answer with neither is not a preference).
    """

    rating: int = 0
    ranking: tuple[int, ...] = ()
    tie: bool = False
    candidate_count: int = 0

    @property
    def prefers(self) -> bool:
        return self.tie or bool(self.ranking)


@dataclass(frozen=True)
class GenerativeAgreement:
    """Agreement of a chat or preference project's responses.

    ``rating_alpha``: ordinal Krippendorff's alpha of the ratings over ``rated_item_count`` items with two or
    more ratings; ``ranking_pair_agreement``: pairwise preference agreement over ``ranked_item_count`` items
    with two or more preferences (rankings or ties).
    """

    rating_alpha: float | None
    rated_item_count: int
    ranking_pair_agreement: float | None
    ranked_item_count: int


def generative_agreement(rated: Sequence[Mapping[str, ResponseRating]]) -> GenerativeAgreement:
    """Agreement statistics of generative items, each given as ``{annotator_id: ResponseRating}``."""
    ratings = [{a: r.rating for a, r in item.items() if r.rating != 0} for item in rated]
    ratings = [unit for unit in ratings if len(unit) >= 2]
    preferences = [
        {a: preference_pairs(r.ranking, r.tie, r.candidate_count) for a, r in item.items() if r.prefers}
        for item in rated
    ]
    preferences = [unit for unit in preferences if len(unit) >= 2]
    return GenerativeAgreement(
        rating_alpha=krippendorff_alpha_ordinal(ratings),
        rated_item_count=len(ratings),
        ranking_pair_agreement=pairwise_preference_agreement(preferences),
        ranked_item_count=len(preferences),
    )


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def observed_pair_agreement(units: Sequence[Sequence[Value]]) -> float:
    """Fraction of all pairs of ratings on the same unit that agree (0 when there is no pair)."""
    agree = pairs = 0
    for unit in units:
        counts = Counter(unit)
        m = len(unit)
        pairs += m * (m - 1) // 2
        agree += sum(c * (c - 1) // 2 for c in counts.values())
    return agree / pairs if pairs else 0.0


@dataclass(frozen=True)
class RatedItem:
    """One item's annotations for the agreement report, and its consensus."""

    item_id: str
    ratings: Mapping[str, tuple[str, ...]]
    consensus: tuple[str, ...]


def agreement_report(
    project_id: str,
    items: Sequence[RatedItem],
    *,
    labels: Sequence[str],
    multi_label: bool,
    annotation_counts: Mapping[str, int],
    agreed: int,
    conflicts: int,
    resolved: int,
    now: datetime,
) -> AgreementReport:
    """The project's report from items with at least two (selected) annotations."""
    rated = [item for item in items if len(item.ratings) >= 2]
    annotators = sorted({a for item in rated for a in item.ratings})
    label_order = _label_order(labels, rated)
    views = _views(rated, label_order, multi_label)

    pairs: list[PairwiseAgreement] = []
    kappas: dict[str, list[float]] = {a: [] for a in annotators}
    for a, b in itertools.combinations(annotators, 2):
        common = [item for item in rated if a in item.ratings and b in item.ratings]
        kappa = _mean([cohen_kappa([(unit[a], unit[b]) for unit in view if a in unit and b in unit]) for view in views])
        observed = _mean(
            [_pair_observed([(unit[a], unit[b]) for unit in view if a in unit and b in unit]) for view in views]
        )
        if kappa is not None:
            kappas[a].append(kappa)
            kappas[b].append(kappa)
        pairs.append(
            PairwiseAgreement(
                annotator_a=a,
                annotator_b=b,
                item_count=len(common),
                cohen_kappa=kappa,
                observed_agreement=observed or 0.0,
                confusion=_confusion(common, a, b, label_order),
            )
        )

    per_annotator = []
    for annotator in sorted(annotation_counts):
        decided = [item for item in items if annotator in item.ratings and item.consensus]
        matching = sum(1 for item in decided if _same(item.ratings[annotator], item.consensus, multi_label=multi_label))
        per_annotator.append(
            AnnotatorAgreement(
                annotator_id=annotator,
                annotation_count=annotation_counts[annotator],
                consensus_agreement=matching / len(decided) if decided else 0.0,
                mean_cohen_kappa=_mean(kappas.get(annotator, [])),
            )
        )

    unit_lists = [[list(unit.values()) for unit in view] for view in views]
    return AgreementReport(
        project_id=project_id,
        item_count=len(rated),
        annotator_count=len(annotators),
        fleiss_kappa=_mean([fleiss_kappa(units) for units in unit_lists]),
        krippendorff_alpha=_mean([krippendorff_alpha(units) for units in unit_lists]),
        observed_agreement=_mean([observed_pair_agreement(units) for units in unit_lists]) or 0.0,
        pairs=tuple(pairs),
        annotators=tuple(per_annotator),
        agreed_item_count=agreed,
        conflict_item_count=conflicts,
        resolved_item_count=resolved,
        compute_time=now,
    )


def _label_order(labels: Sequence[str], items: Sequence[RatedItem]) -> tuple[str, ...]:
    # Schema order first; a label no longer in the schema (possible only without annotations) goes last.
    seen = {label for item in items for values in item.ratings.values() for label in values}
    extra = sorted(seen - set(labels))
    return (*labels, *extra)


def _views(items: Sequence[RatedItem], labels: Sequence[str], multi_label: bool) -> list[list[dict[str, Value]]]:
    """Units to score: one view of labels (single-label) or one binary view per label (multi-label)."""
    if not multi_label:
        return [[{a: values[0] for a, values in item.ratings.items() if values} for item in items]]
    return [[{a: label in values for a, values in item.ratings.items()} for item in items] for label in labels]


def _pair_observed(pairs: Sequence[tuple[Value, Value]]) -> float | None:
    return sum(1 for a, b in pairs if a == b) / len(pairs) if pairs else None


def _confusion(common: Sequence[RatedItem], a: str, b: str, labels: Sequence[str]) -> ConfusionMatrix:
    """Rows: a's label, columns: b's label. Multi-label items add one count per (a label, b label) pair."""
    index = {label: i for i, label in enumerate(labels)}
    size = len(labels)
    counts = [0] * (size * size)
    for item in common:
        for la in item.ratings[a]:
            for lb in item.ratings[b]:
                counts[index[la] * size + index[lb]] += 1
    return ConfusionMatrix(labels=tuple(labels), counts=tuple(counts))


def _same(values: Sequence[str], consensus: Sequence[str], *, multi_label: bool) -> bool:
    return set(values) == set(consensus) if multi_label else tuple(values[:1]) == tuple(consensus[:1])


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
