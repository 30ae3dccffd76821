"""The project page's agreement matrix and chart data, from the labeling service's reports."""

from __future__ import annotations

from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.console.domain.desk import AgreementMatrix, chart_data


def _report() -> pb.AgreementReport:
    return pb.AgreementReport(
        pairs=[
            pb.PairwiseAgreement(
                annotator_a="ann-b", annotator_b="ann-a", item_count=12, cohen_kappa=0.5, observed_agreement=0.75
            ),
            pb.PairwiseAgreement(annotator_a="ann-a", annotator_b="ann-c", item_count=3, observed_agreement=1.0),
        ],
        annotators=[
            pb.AnnotatorAgreement(annotator_id="ann-c", annotation_count=3, consensus_agreement=1.0),
            pb.AnnotatorAgreement(annotator_id="ann-a", annotation_count=15, consensus_agreement=0.8),
        ],
    )


def test_the_matrix_is_symmetric_and_keeps_undefined_kappas_undefined() -> None:
    matrix = AgreementMatrix.of(_report())
    assert matrix.annotators == ["ann-a", "ann-b", "ann-c"]
    assert matrix.kappa[("ann-a", "ann-b")] == matrix.kappa[("ann-b", "ann-a")] == 0.5
    assert matrix.items[("ann-b", "ann-a")] == 12 and matrix.observed[("ann-a", "ann-b")] == 0.75
    # Chance agreement 1 (one label throughout): kappa is undefined, not 0.
    assert matrix.kappa[("ann-c", "ann-a")] is None and matrix.observed[("ann-c", "ann-a")] == 1.0
    assert ("ann-b", "ann-c") not in matrix.items  # no item labeled by both


def test_chart_data_sums_the_newest_versions_splits_and_orders_annotators() -> None:
    newest = pb.DatasetVersion(
        version_number=3,
        splits=[
            pb.SplitSummary(item_count_by_label={"positive": 8, "negative": 6}),
            pb.SplitSummary(item_count_by_label={"positive": 1, "negative": 1}),
        ],
    )
    older = pb.DatasetVersion(version_number=2, splits=[pb.SplitSummary(item_count_by_label={"positive": 99})])
    data = chart_data(_report(), [newest, older])
    assert data["version"] == 3 and data["labels"] == {"negative": 7, "positive": 9}
    assert [a["id"] for a in data["annotators"]] == ["ann-a", "ann-c"]
    assert data["annotators"][0] == {"id": "ann-a", "agreement": 0.8, "annotations": 15}
    assert chart_data(pb.AgreementReport(), []) == {"version": None, "labels": {}, "annotators": []}
