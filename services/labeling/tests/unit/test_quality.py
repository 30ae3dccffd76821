"""Consensus and agreement statistics, checked against examples computed by hand."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.agreement import (
    RatedItem,
    agreement_report,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    observed_pair_agreement,
)
from gristmill.labeling.domain.consensus import compute_consensus
from gristmill.labeling.domain.service import LabelingService

NOW = datetime(2026, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- consensus


def test_single_label_majority_tie_and_too_few() -> None:
    labeled = compute_consensus([["a"], ["a"], ["b"]], required=3, multi_label=False)
    assert labeled.status is m.ItemStatus.LABELED
    assert labeled.consensus == m.Consensus(labels=("a",), agreement=2 / 3)
    tie = compute_consensus([["a"], ["b"]], required=2, multi_label=False)
    assert tie.status is m.ItemStatus.CONFLICT and tie.consensus.tied and tie.consensus.labels == ()
    assert compute_consensus([["a"]], required=2, multi_label=False).status is m.ItemStatus.UNLABELED


def test_resolution_wins_over_the_vote() -> None:
    result = compute_consensus([["a"], ["b"]], required=2, multi_label=False, resolved_labels=["b"], resolved_by="rev")
    assert result.status is m.ItemStatus.RESOLVED
    assert result.consensus == m.Consensus(labels=("b",), agreement=0.5, resolved_by="rev")


def test_multi_label_majority_per_label() -> None:
    # x chosen 3/3, y 2/3 → {x, y}; two of the three annotations equal {x, y}.
    result = compute_consensus([["x", "y"], ["x"], ["y", "x"]], required=3, multi_label=True)
    assert result.status is m.ItemStatus.LABELED
    assert result.consensus == m.Consensus(labels=("x", "y"), agreement=2 / 3)
    # x and y each chosen by exactly half: a tie.
    assert compute_consensus([["x"], ["y"]], required=2, multi_label=True).consensus.tied
    # Each label chosen by a third: no majority, no tie, still a conflict for review.
    none = compute_consensus([["x"], ["y"], ["z"]], required=3, multi_label=True)
    assert none.status is m.ItemStatus.CONFLICT and not none.consensus.tied


# --------------------------------------------------------------------------- kappa and alpha


def test_cohen_kappa_hand_computed() -> None:
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = (20 + 15) / 50 = 0.7; p_A(yes) = 25/50 = 0.5, p_B(yes) = 30/50 = 0.6;
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)


def test_cohen_kappa_perfect_and_undefined() -> None:
    assert cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    # Both always said "a": chance agreement is 1, kappa is undefined.
    assert cohen_kappa([("a", "a"), ("a", "a")]) is None
    assert cohen_kappa([]) is None


UNITS = [["a", "a", "a"], ["a", "a", "b"], ["b", "b", "b"], ["a", "b", "b"]]


def test_fleiss_kappa_hand_computed() -> None:
    # P_i = (sum n_ij^2 - n) / (n (n - 1)), n = 3: item 1 (9-3)/6 = 1, item 2 (4+1-3)/6 = 1/3, item 3 1,
    # item 4 1/3 → P = (8/3) / 4 = 2/3. p_a = 6/12, p_b = 6/12 → P_e = 0.5. kappa = (2/3 - 1/2) / (1/2) = 1/3.
    assert fleiss_kappa(UNITS) == pytest.approx(1 / 3)


def test_krippendorff_alpha_hand_computed() -> None:
    # Disagreeing coincidences: units 2 and 4 each add 2*1/2 + 1*2/2 = 2 → sum 4. n = 12, n_a = n_b = 6,
    # sum_{c != k} n_c n_k = 2 * 36 = 72. alpha = 1 - (12 - 1) * 4 / 72 = 1 - 44/72 = 28/72.
    assert krippendorff_alpha(UNITS) == pytest.approx(28 / 72)
    # A unit with a single value carries no pairable information and is ignored.
    assert krippendorff_alpha([*UNITS, ["a"]]) == pytest.approx(28 / 72)
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None


def test_observed_pair_agreement_hand_computed() -> None:
    # Agreeing pairs: 3 + 1 + 3 + 1 = 8 of 4 * 3 = 12 pairs.
    assert observed_pair_agreement(UNITS) == pytest.approx(8 / 12)


def test_multi_label_statistics_average_the_per_label_binary_decisions() -> None:
    # Label x (chosen or not): A 1,1,0,1 vs B 1,1,0,0 → p_o = 3/4, p_e = 3/4*2/4 + 1/4*2/4 = 1/2, kappa 0.5.
    # Label y: A 0,1,1,0 vs B 0,0,1,1 → p_o = 2/4, p_e = 2/4*2/4 + 2/4*2/4 = 1/2, kappa 0. Mean 0.25.
    items = [
        RatedItem("i1", {"A": ("x",), "B": ("x",)}, ("x",)),
        RatedItem("i2", {"A": ("x", "y"), "B": ("x",)}, ()),
        RatedItem("i3", {"A": ("y",), "B": ("y",)}, ("y",)),
        RatedItem("i4", {"A": ("x",), "B": ("y",)}, ()),
    ]
    report = agreement_report(
        "p",
        items,
        labels=("x", "y"),
        multi_label=True,
        annotation_counts={"A": 4, "B": 4},
        agreed=2,
        conflicts=2,
        resolved=0,
        now=NOW,
    )
    (pair,) = report.pairs
    assert pair.cohen_kappa == pytest.approx(0.25)
    assert pair.observed_agreement == pytest.approx((3 / 4 + 2 / 4) / 2)
    # Rows A, columns B: i1 (x,x), i2 (x,x) and (y,x), i3 (y,y), i4 (x,y).
    assert pair.confusion == m.ConfusionMatrix(("x", "y"), (2, 1, 1, 1))


def test_agreement_report_for_two_annotators() -> None:
    # Three items, A and B: agree on i1 (pos) and i2 (neg), disagree on i3 (A pos, B neg).
    # p_o = 2/3; p_A(pos) = 2/3, p_B(pos) = 1/3 → p_e = 2/3*1/3 + 1/3*2/3 = 4/9; kappa = (2/3 - 4/9)/(5/9) = 2/5.
    items = [
        RatedItem("i1", {"A": ("pos",), "B": ("pos",)}, ("pos",)),
        RatedItem("i2", {"A": ("neg",), "B": ("neg",)}, ("neg",)),
        RatedItem("i3", {"A": ("pos",), "B": ("neg",)}, ()),
        RatedItem("i4", {"A": ("pos",)}, ()),  # one annotation: not part of the statistics
    ]
    report = agreement_report(
        "p",
        items,
        labels=("neg", "pos"),
        multi_label=False,
        annotation_counts={"A": 4, "B": 3},
        agreed=2,
        conflicts=1,
        resolved=0,
        now=NOW,
    )
    assert (report.item_count, report.annotator_count) == (3, 2)
    (pair,) = report.pairs
    assert pair.cohen_kappa == pytest.approx(0.4)
    assert pair.confusion == m.ConfusionMatrix(("neg", "pos"), (1, 0, 1, 1))
    # With two raters Fleiss' kappa (Scott's pi): P = 2/3, p_pos = p_neg = 1/2 → (2/3 - 1/2)/(1/2) = 1/3.
    assert report.fleiss_kappa == pytest.approx(1 / 3)
    assert report.observed_agreement == pytest.approx(2 / 3)
    by_annotator = {a.annotator_id: a for a in report.annotators}
    # A matches the consensus on i1 and i2 (i3 and i4 have none): 2/2.
    assert by_annotator["A"].consensus_agreement == pytest.approx(1.0)
    assert by_annotator["B"].mean_cohen_kappa == pytest.approx(0.4)


def test_agreement_through_the_service(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project(annotations_per_item=2)
    import_jsonl("p1", [{"id": f"e{i}", "text": f"item {w} text"} for i, w in enumerate(["one", "two", "three"])])
    items = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=10)
    for item, (a, b) in zip(items, [("pos", "pos"), ("neg", "neg"), ("pos", "neg")], strict=True):
        service.submit_annotation("", "p1", item.item_id, "ann-a", task_id="", labels=[a], spans=(), comment="")
        service.submit_annotation("", "p1", item.item_id, "ann-b", task_id="", labels=[b], spans=(), comment="")
    report = service.get_agreement("", "p1", [])
    assert (report.agreed_item_count, report.conflict_item_count) == (2, 1)
    assert report.pairs[0].cohen_kappa == pytest.approx(0.4)
    # Restricting to one annotator leaves no pair: statistics are unset, not an error.
    only_a = service.get_agreement("", "p1", ["ann-a"])
    assert (only_a.item_count, only_a.fleiss_kappa, only_a.pairs) == (0, None, ())
