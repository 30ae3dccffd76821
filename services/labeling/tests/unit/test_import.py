"""Imports through the service: cleaning report, exact and near duplicates, PII, atomicity, idempotency."""

from __future__ import annotations

from typing import Any

import pytest

from gristmill.core.errors import InvalidArgumentError, NotFoundError
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.store.sql import SqlLabelingStore

Rows = list[dict[str, Any]]


def _texts(service: LabelingService, project_id: str = "p1") -> list[str]:
    items = service.list_items(
        "", project_id, statuses=[], source=None, include_annotations=False, offset=0, limit=1000
    )
    return [item.text for item in items]


def test_cleaning_report_counts_every_outcome(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project(cleaning=m.CleaningSettings(max_text_chars=40))
    report = import_jsonl(
        "p1",
        [
            {"id": "1", "text": "  Great   phone  ", "label": "pos"},
            {"id": "2", "text": "   "},
            {"id": "3", "text": "x" * 41},
            {"id": "4", "text": "Great phone"},  # same text as 1 after normalisation
            {"id": "5", "text": "mail me: jane@example.com"},
            {"id": "6", "text": "the screen cracked on day one"},
            {"id": "7", "text": "The screen cracked, on day one!"},  # same word bigrams as 6
        ],
    )
    assert report.received_count == 7
    assert report.accepted_count == 3
    assert report.normalized_count == 1
    assert (report.dropped_empty_count, report.dropped_too_long_count) == (1, 1)
    assert report.dropped_exact_duplicate_count == 1
    assert report.dropped_near_duplicate_count == 1
    assert report.pii_masked_item_count == 1 and report.pii_masked_by_kind == {"EMAIL": 1}
    assert report.imported_label_count == 1
    reasons = {(d.line_number, d.external_id, d.reason) for d in report.drops}
    assert reasons == {
        (2, "2", m.DropReason.EMPTY),
        (3, "3", m.DropReason.TOO_LONG),
        (4, "4", m.DropReason.EXACT_DUPLICATE),
        (7, "7", m.DropReason.NEAR_DUPLICATE),
    }
    near = next(d for d in report.drops if d.reason is m.DropReason.NEAR_DUPLICATE)
    assert near.similarity >= 0.9 and near.duplicate_of_item_id
    assert service.get_item("", "p1", near.duplicate_of_item_id).text == "the screen cracked on day one"
    # Stored texts are normalised and masked: the raw e-mail address is nowhere.
    assert sorted(_texts(service)) == ["Great phone", "mail me: [EMAIL]", "the screen cracked on day one"]
    # The imported label became an annotation by "import", and with one annotation needed the item is labeled.
    labeled = service.list_items(
        "", "p1", statuses=[m.ItemStatus.LABELED], source=None, include_annotations=True, offset=0, limit=10
    )
    assert [(i.text, i.consensus.labels, i.annotations[0].annotator_id) for i in labeled] == [
        ("Great phone", ("pos",), "import")
    ]
    assert service.get_import("", "p1", report.import_id) == report


def test_duplicates_of_what_the_project_already_has_are_dropped(make_project: Any, import_jsonl: Any) -> None:
    make_project()
    first = import_jsonl("p1", [{"id": "a", "text": "battery died after a week of light use"}])
    second = import_jsonl(
        "p1",
        [
            {"id": "a", "text": "something new"},  # same external id: a re-import of the record
            {"id": "b", "text": "Battery died after a week of light use"},  # near duplicate (case only)
            {"id": "c", "text": "battery died after a week of light use"},  # exact duplicate
            {"id": "d", "text": "arrived quickly and works fine"},
        ],
    )
    assert first.accepted_count == 1
    assert second.accepted_count == 1
    assert second.dropped_existing_external_id_count == 1
    assert second.dropped_exact_duplicate_count == 1
    assert second.dropped_near_duplicate_count == 1


def test_near_duplicate_index_is_rebuilt_from_the_database(
    make_project: Any, import_jsonl: Any, store: SqlLabelingStore, objects: LocalObjectStore, clock: Any
) -> None:
    make_project()
    import_jsonl("p1", [{"text": "the charger stopped working after two weeks"}])
    # A fresh service (a restart): its index is empty until the import rebuilds it from stored signatures.
    restarted = LabelingService(store, objects, clock=clock)
    session = restarted.begin_import("", m.ImportOptions("p1", m.ImportFormat.JSONL))
    assert not isinstance(session, m.ImportReport)
    session.feed_chunk(b'{"text": "The charger stopped working after two weeks!"}\n')
    report = restarted.finish_import(session)
    assert report.dropped_near_duplicate_count == 1 and report.accepted_count == 0


def test_flag_policy_keeps_the_item_and_points_at_the_original(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project(cleaning=m.CleaningSettings(near_duplicate_policy=m.NearDuplicatePolicy.FLAG))
    report = import_jsonl(
        "p1", [{"id": "1", "text": "love the camera quality"}, {"id": "2", "text": "Love the camera quality."}]
    )
    assert (report.accepted_count, report.flagged_near_duplicate_count) == (2, 1)
    flagged = next(d for d in report.drops if d.reason is m.DropReason.NEAR_DUPLICATE_FLAGGED)
    items = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=10)
    assert items[1].near_duplicate_of_item_id == items[0].item_id == flagged.duplicate_of_item_id


def test_off_policy_keeps_near_duplicates(make_project: Any, import_jsonl: Any) -> None:
    make_project(cleaning=m.CleaningSettings(near_duplicate_policy=m.NearDuplicatePolicy.OFF))
    report = import_jsonl("p1", [{"text": "love the camera quality"}, {"text": "Love the camera quality."}])
    assert (report.accepted_count, report.dropped_near_duplicate_count) == (2, 0)


def test_raw_text_is_stored_only_when_the_project_allows_it(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project("raw", cleaning=m.CleaningSettings(pii=m.PiiSettings(store_raw_text=True)))
    report = import_jsonl("raw", [{"text": "call 0612 345 678"}])
    assert report.pii_masked_item_count == 0
    assert _texts(service, "raw") == ["call 0612 345 678"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"text": "fine"}', '{"text": "also fine", "label": "maybe"}'], r"line 2, field 'label'"),
        (['{"text": "fine"}', "not json"], r"line 2: malformed JSON"),
        ([b'{"text": "fine"}', b'{"text": "\xff"}'], r"line 2 is not valid UTF-8"),
        (['{"text": "fine"}', '{"text": "' + "x" * (1 << 20) + '"}'], r"line 2 is .*over the 1 MiB limit"),
    ],
)
def test_a_bad_record_fails_the_import_and_stores_nothing(
    make_project: Any, import_jsonl: Any, service: LabelingService, rows: list[Any], message: str
) -> None:
    make_project()
    with pytest.raises(InvalidArgumentError, match=message):
        import_jsonl("p1", rows)
    assert service.get_project("", "p1").stats.item_count == 0
    assert service.list_imports("", "p1", offset=0, limit=10) == []
    # The failed import left nothing behind in the near-duplicate index either.
    assert import_jsonl("p1", ['{"text": "fine"}']).accepted_count == 1


def test_a_retry_with_the_same_request_id_stores_nothing_new(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project()
    first = import_jsonl("p1", [{"text": "one"}, {"text": "two"}], request_id="upload-1")
    again = import_jsonl("p1", [{"text": "three"}], request_id="upload-1")
    assert again == first
    assert service.get_project("", "p1").stats.item_count == 2


def test_import_into_an_unknown_project_is_not_found(service: LabelingService) -> None:
    with pytest.raises(NotFoundError):
        service.begin_import("", m.ImportOptions("ghost", m.ImportFormat.JSONL))


def test_import_from_an_object(make_project: Any, service: LabelingService, objects: LocalObjectStore) -> None:
    make_project()
    objects.put_bytes("uploads/reviews.csv", b"id,text,label\nr1,works,pos\nr2,broke,neg\n")
    options = m.ImportOptions("p1", m.ImportFormat.CSV, csv=m.CsvOptions(has_header=True))
    report = service.import_from_object("", options, "uploads/reviews.csv")
    assert (report.accepted_count, report.imported_label_count) == (2, 2)
    with pytest.raises(NotFoundError, match="does not exist"):
        service.import_from_object("", options, "uploads/missing.csv")
    with pytest.raises(InvalidArgumentError, match="object key"):
        service.import_from_object("", options, "../etc/passwd")


def test_near_and_exact_duplicates_across_spool_batches(make_project: Any, import_jsonl: Any) -> None:
    # More records than one spool batch (2,000): the duplicates of the first record come in a later
    # batch, where only the database (the import's own staged rows) and the index remember it.
    make_project()
    rows: Rows = [{"id": f"r{i}", "text": f"alpha{i} beta{i} gamma{i} delta{i}"} for i in range(2_100)]
    rows.append({"id": "near", "text": "ALPHA0 beta0, gamma0 delta0!"})
    rows.append({"id": "exact", "text": "alpha1 beta1 gamma1 delta1"})
    report = import_jsonl("p1", rows)
    assert report.accepted_count == 2_100
    assert (report.dropped_near_duplicate_count, report.dropped_exact_duplicate_count) == (1, 1)
    assert {d.external_id: d.line_number for d in report.drops} == {"near": 2_101, "exact": 2_102}


def test_cycle_collection_is_paused_during_an_import_and_restored() -> None:
    import gc

    from gristmill.labeling.domain.importer import cycle_collection_paused

    assert gc.isenabled()
    with cycle_collection_paused():
        with cycle_collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    gc.disable()
    try:
        with cycle_collection_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
