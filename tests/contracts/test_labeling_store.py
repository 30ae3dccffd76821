"""Labeling store contract: every port of ``gristmill.labeling.domain.ports`` behaves the same on SQLite and
PostgreSQL (``database_url`` is a fresh, empty database of each).

Ports: projects and schema versions (uniqueness per organisation, paging, the schema-change rule applied in
the store's transaction), items and imports (one transaction per import, concurrent duplicates, idempotency
keys, filters, predictions all or none), tasks and annotations (leases, their expiry, offer order, skips,
idempotent resubmission, consensus by the caller's rule, resolutions), and dataset versions (numbering,
immutability, the announcement written into the same transaction's outbox).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gristmill.core.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
)
from gristmill.core.events import Outbox
from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.ordering import OfferRule, order_key
from gristmill.labeling.domain.ports import LabelingStore, NewItem, PredictionTarget
from gristmill.labeling.domain.schema import schema_change_needed
from gristmill.labeling.events.payloads import LabelingEvents
from gristmill.labeling.store.sql import SqlLabelingStore
from tests.support.databases import migrated_database

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORG = "default"
SINGLE = ConsensusRule(required=2, multi_label=False)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = migrated_database(database_url, "labeling")
    yield database
    database.dispose()


@pytest.fixture
def store(database: Database) -> LabelingStore:
    return SqlLabelingStore(database, events=LabelingEvents(platform_catalog()))


def _project(
    project_id: str = "p1",
    *,
    labels: tuple[str, ...] = ("neg", "pos"),
    at: datetime = T0,
    **settings: object,
) -> m.Project:
    schema = m.LabelSchema(project_id, 1, tuple(m.LabelDefinition(n, f"{n} text") for n in labels), at)
    return m.Project(
        organization_id=ORG,
        project_id=project_id,
        display_name=project_id.upper(),
        description="d",
        task_type=m.TaskType.TEXT_CLASSIFICATION,
        label_schema=schema,
        settings=m.ProjectSettings(**{"annotations_per_item": 2, "task_ordering": m.TaskOrdering.RANDOM, **settings}),  # type: ignore[arg-type]
        create_time=at,
        update_time=at,
    )


def _item(item_id: str, text: str = "", *, labels: tuple[str, ...] = (), shuffle_key: int = 1) -> NewItem:
    return NewItem(
        item_id=item_id,
        external_id=f"ext-{item_id}",
        text=text or f"text of {item_id}",
        text_hash=f"{item_id:0>64}",
        signature=None,
        metadata={"k": "v"},
        near_duplicate_of_item_id="",
        shuffle_key=shuffle_key,
        labels=labels,
    )


def _import(
    store: LabelingStore,
    items: Sequence[NewItem],
    *,
    project_id: str = "p1",
    import_id: str = "i1",
    consensus: ConsensusRule = SINGLE,
    report: m.ImportReport | None = None,
    request_id: str = "",
) -> None:
    with store.open_import(ORG, project_id, T0, consensus=consensus) as writer:
        writer.add_items(items, source=m.ItemSource.IMPORT, import_id=import_id, annotator_id="import")
        writer.finish(report, request_id)


def _offer(project: m.Project, annotator_id: str) -> OfferRule:
    return OfferRule.for_annotator(project, annotator_id)


def _lease(store: LabelingStore, project: m.Project, annotator_id: str, now: datetime = T0) -> m.Task | None:
    task, _ = store.next_task(
        ORG, project.project_id, annotator_id, lease_seconds=60, now=now, offer=_offer(project, annotator_id)
    )
    return task


def _submit(
    store: LabelingStore, item_id: str, annotator_id: str, labels: tuple[str, ...], *, task_id: str = ""
) -> m.Annotation:
    return store.submit_annotation(
        ORG, "p1", item_id, annotator_id, task_id=task_id, labels=labels, spans=(), comment="", now=T0, consensus=SINGLE
    )


# ----------------------------------------------------------------------------- projects and schemas


def test_create_and_get_project_with_its_first_schema(store: LabelingStore) -> None:
    created = store.create_project(_project())
    assert created.project_id == "p1" and created.organization_id == ORG
    assert created.label_schema.version == 1
    assert created.label_schema.labels == (m.LabelDefinition("neg", "neg text"), m.LabelDefinition("pos", "pos text"))
    assert created.settings == m.ProjectSettings(annotations_per_item=2, task_ordering=m.TaskOrdering.RANDOM)
    assert created.create_time == T0
    assert store.get_project(ORG, "p1") == created
    assert created.stats == m.ProjectStats()


def test_project_ids_are_unique_per_organisation(store: LabelingStore) -> None:
    store.create_project(_project())
    with pytest.raises(AlreadyExistsError, match="'p1' already exists"):
        store.create_project(_project())
    store.create_project(replace(_project(), organization_id="acme"))
    assert store.get_project("acme", "p1").organization_id == "acme"


def test_unknown_project_is_not_found_and_other_organisations_are_invisible(store: LabelingStore) -> None:
    with pytest.raises(NotFoundError, match="'nope' does not exist"):
        store.get_project(ORG, "nope")
    store.create_project(_project())
    with pytest.raises(NotFoundError):
        store.get_project("another-org", "p1")
    with pytest.raises(NotFoundError):
        store.list_items("another-org", "p1", statuses=(), source=None, include_annotations=False, offset=0, limit=9)


def test_list_projects_newest_first_with_offset_and_limit(store: LabelingStore) -> None:
    for i in range(3):
        store.create_project(_project(f"p{i}", at=T0 + timedelta(minutes=i)))
    assert [p.project_id for p in store.list_projects(ORG, offset=0, limit=10)] == ["p2", "p1", "p0"]
    assert [p.project_id for p in store.list_projects(ORG, offset=1, limit=1)] == ["p1"]
    assert store.list_projects(ORG, offset=3, limit=10) == []
    assert store.list_projects("other", offset=0, limit=10) == []


def test_update_project_changes_only_given_fields(store: LabelingStore) -> None:
    store.create_project(_project())
    later = T0 + timedelta(hours=1)
    settings = m.ProjectSettings(lease_seconds=30)
    updated = store.update_project(ORG, "p1", display_name=None, description="new", settings=settings, now=later)
    assert (updated.display_name, updated.description, updated.settings) == ("P1", "new", settings)
    assert updated.update_time == later and updated.create_time == T0
    assert store.get_project(ORG, "p1") == updated


def test_schema_versions(store: LabelingStore) -> None:
    store.create_project(_project())
    labels = (m.LabelDefinition("neg", "neg text"), m.LabelDefinition("pos", "pos text"))
    # Equal to the current schema: no new version.
    assert store.update_label_schema(ORG, "p1", labels, T0, rule=schema_change_needed).version == 1
    v2 = store.update_label_schema(
        ORG, "p1", (*labels, m.LabelDefinition("mixed")), T0 + timedelta(1), rule=schema_change_needed
    )
    assert v2.version == 2 and v2.names == ("neg", "pos", "mixed")
    assert store.get_project(ORG, "p1").label_schema == v2
    assert store.get_label_schema(ORG, "p1", 1).names == ("neg", "pos")
    assert store.get_label_schema(ORG, "p1", None) == v2
    assert [s.version for s in store.list_label_schemas(ORG, "p1", offset=0, limit=10)] == [2, 1]
    assert [s.version for s in store.list_label_schemas(ORG, "p1", offset=1, limit=10)] == [1]
    with pytest.raises(NotFoundError, match="no label schema version 9"):
        store.get_label_schema(ORG, "p1", 9)


def test_a_label_in_use_cannot_be_removed_but_an_unused_one_can(store: LabelingStore) -> None:
    store.create_project(_project(labels=("neg", "pos", "spare", "resolved")))
    _import(store, [_item("a1", labels=("neg",)), _item("a2")])
    store.resolve_item(ORG, "p1", "a2", "rev", ["resolved"], "", T0, consensus=SINGLE)
    rule = schema_change_needed
    with pytest.raises(FailedPreconditionError, match="label 'neg' is used by existing annotations"):
        store.update_label_schema(ORG, "p1", (m.LabelDefinition("pos"), m.LabelDefinition("resolved")), T0, rule=rule)
    with pytest.raises(FailedPreconditionError, match="label 'resolved' is used"):
        store.update_label_schema(ORG, "p1", (m.LabelDefinition("neg"), m.LabelDefinition("pos")), T0, rule=rule)
    assert store.get_project(ORG, "p1").label_schema.version == 1
    keep = (m.LabelDefinition("neg"), m.LabelDefinition("pos"), m.LabelDefinition("resolved"))
    assert store.update_label_schema(ORG, "p1", keep, T0, rule=rule).names == ("neg", "pos", "resolved")


# ----------------------------------------------------------------------------- items and imports


def test_import_writer_is_one_transaction(store: LabelingStore) -> None:
    store.create_project(_project())
    with pytest.raises(RuntimeError), store.open_import(ORG, "p1", T0, consensus=SINGLE) as writer:
        writer.add_items([_item("a1")], source=m.ItemSource.IMPORT, import_id="i1", annotator_id="x")
        raise RuntimeError("client went away")
    assert store.get_project(ORG, "p1").stats.item_count == 0
    with store.open_import(ORG, "p1", T0, consensus=SINGLE) as writer:
        writer.add_items([_item("a1"), _item("a2")], source=m.ItemSource.IMPORT, import_id="i2", annotator_id="x")
        stored = writer.finish(None, "")
    assert stored.count == 2 and stored.last_seq - stored.first_seq == 1
    with store.open_import(ORG, "p1", T0, consensus=SINGLE) as writer:
        assert writer.existing_external_ids(["ext-a1", "ext-zz"]) == {"ext-a1"}
        assert writer.existing_hashes([f"{'a2':0>64}", "f" * 64]) == {f"{'a2':0>64}": "a2"}


def test_a_concurrent_duplicate_aborts_the_whole_import(store: LabelingStore) -> None:
    store.create_project(_project())
    _import(store, [_item("a1")])
    clash = replace(_item("a9"), external_id="ext-a1")
    with pytest.raises(AbortedError, match="retry the import"):
        _import(store, [_item("a2"), clash], import_id="i2")
    assert store.get_project(ORG, "p1").stats.item_count == 1


def test_imports_are_recorded_once_per_request_id(store: LabelingStore) -> None:
    store.create_project(_project())
    drop = m.DroppedRecord(line_number=3, external_id="x", reason=m.DropReason.EMPTY)
    report = m.ImportReport("i1", "p1", "a.jsonl", T0, accepted_count=1, drops=[drop])
    _import(store, [_item("a1")], report=report, request_id="req-1")
    assert store.find_import(ORG, "p1", "req-1") == report
    assert store.find_import(ORG, "p1", "req-2") is None
    assert store.get_import(ORG, "p1", "i1") == report
    assert store.list_imports(ORG, "p1", offset=0, limit=10) == [replace(report, drops=[])]
    with pytest.raises(NotFoundError, match="import 'i9' does not exist"):
        store.get_import(ORG, "p1", "i9")
    again = replace(report, import_id="i2")
    with pytest.raises(AbortedError):
        _import(store, [_item("a2")], import_id="i2", report=again, request_id="req-1")
    assert store.get_project(ORG, "p1").stats.item_count == 1


def test_imported_labels_get_the_callers_consensus_and_items_list_in_import_order(store: LabelingStore) -> None:
    store.create_project(_project())
    one = ConsensusRule(required=1, multi_label=False)
    _import(store, [_item("a1", labels=("pos",)), _item("a2"), _item("a3", labels=("neg",))], consensus=one)
    item = store.get_item(ORG, "p1", "a1")
    assert item.status is m.ItemStatus.LABELED and item.consensus.labels == ("pos",)
    assert [a.annotator_id for a in item.annotations] == ["import"] and item.metadata == {"k": "v"}

    def ids(**kwargs: object) -> list[str]:
        args = {"statuses": (), "source": None, "include_annotations": False, "offset": 0, "limit": 10, **kwargs}
        return [i.item_id for i in store.list_items(ORG, "p1", **args)]  # type: ignore[arg-type]

    assert ids() == ["a1", "a2", "a3"]
    assert ids(offset=1, limit=1) == ["a2"]
    assert ids(statuses=(m.ItemStatus.UNLABELED,)) == ["a2"]
    assert ids(source=m.ItemSource.PREDICTION_LOG) == []
    listed = store.list_items(ORG, "p1", statuses=(), source=None, include_annotations=False, offset=0, limit=1)
    assert listed[0].annotations == ()
    with pytest.raises(NotFoundError, match="item 'zz' does not exist"):
        store.get_item(ORG, "p1", "zz")


def test_predictions_attach_all_or_none_and_replace_the_same_model_version(store: LabelingStore) -> None:
    store.create_project(_project())
    _import(store, [_item("a1"), _item("a2")])

    def prediction(p: float, at: datetime = T0) -> m.Prediction:
        return m.Prediction("clf", 1, ("pos",), {"pos": p, "neg": 1 - p}, at)

    with pytest.raises(NotFoundError, match="external id 'nope'"):
        store.attach_predictions(
            ORG,
            "p1",
            [
                (PredictionTarget(item_id="a1"), prediction(0.6)),
                (PredictionTarget(external_id="nope"), prediction(0.5)),
            ],
        )
    assert store.get_item(ORG, "p1", "a1").predictions == ()
    attached = store.attach_predictions(
        ORG,
        "p1",
        [(PredictionTarget(item_id="a1"), prediction(0.6)), (PredictionTarget(external_id="ext-a2"), prediction(0.7))],
    )
    assert attached == 2
    store.attach_predictions(ORG, "p1", [(PredictionTarget(item_id="a1"), prediction(0.9, T0 + timedelta(1)))])
    assert [p.probabilities["pos"] for p in store.get_item(ORG, "p1", "a1").predictions] == [0.9]


def test_signatures_come_back_after_a_sequence_number(store: LabelingStore) -> None:
    store.create_project(_project())
    _import(store, [replace(_item("a1"), signature=b"\x01\x02"), _item("a2"), replace(_item("a3"), signature=b"\x03")])
    found = list(store.iter_signatures(ORG, "p1", after_seq=0))
    assert [(item_id, sig) for _, item_id, sig in found] == [("a1", b"\x01\x02"), ("a3", b"\x03")]
    assert [item_id for _, item_id, _ in store.iter_signatures(ORG, "p1", after_seq=found[0][0])] == ["a3"]


# ----------------------------------------------------------------------------- tasks and annotations


def test_a_lease_is_kept_until_it_expires_then_the_item_is_offered_again(store: LabelingStore) -> None:
    project = store.create_project(_project(annotations_per_item=1, task_ordering=m.TaskOrdering.SEQUENTIAL))
    _import(store, [_item("a1"), _item("a2")])
    first = _lease(store, project, "ann")
    assert first is not None and first.item.item_id == "a1" and first.lease_expire_time == T0 + timedelta(seconds=60)
    assert first.item.annotations == () and first.label_schema.names == ("neg", "pos")
    # The same annotator asking again keeps the lease; the item's only slot is taken for everyone else.
    again, remaining = store.next_task(
        ORG, "p1", "ann", lease_seconds=60, now=T0 + timedelta(seconds=10), offer=_offer(project, "ann")
    )
    assert again is not None and again.task_id == first.task_id and remaining == 2
    other = _lease(store, project, "bob", T0 + timedelta(seconds=59))
    assert other is not None and other.item.item_id == "a2"
    assert _lease(store, project, "cy", T0 + timedelta(seconds=59)) is None
    late = _lease(store, project, "cy", T0 + timedelta(seconds=61))
    assert late is not None and late.item.item_id == "a1"


def test_submitting_closes_the_lease_and_a_retry_is_answered_as_the_first_time(store: LabelingStore) -> None:
    project = store.create_project(_project(task_ordering=m.TaskOrdering.SEQUENTIAL))
    _import(store, [_item("a1")])
    task = _lease(store, project, "ann")
    assert task is not None
    with pytest.raises(NotFoundError, match="task 'nope'"):
        _submit(store, "a1", "ann", ("pos",), task_id="nope")
    with pytest.raises(FailedPreconditionError, match="lease of another annotator"):
        _submit(store, "a1", "bob", ("pos",), task_id=task.task_id)
    first = _submit(store, "a1", "ann", ("pos",), task_id=task.task_id)
    assert _submit(store, "a1", "ann", ("pos",), task_id=task.task_id) == first
    with pytest.raises(AlreadyExistsError, match="already annotated item 'a1'"):
        _submit(store, "a1", "ann", ("neg",))
    assert _lease(store, project, "ann") is None
    assert store.get_item(ORG, "p1", "a1").status is m.ItemStatus.UNLABELED
    _submit(store, "a1", "bob", ("pos",))
    item = store.get_item(ORG, "p1", "a1")
    assert item.status is m.ItemStatus.LABELED and item.consensus.labels == ("pos",)
    assert sorted(a.annotator_id for a in item.annotations) == ["ann", "bob"]
    assert store.get_project(ORG, "p1").stats.annotation_count == 2


def test_only_the_author_updates_an_annotation_and_consensus_follows(store: LabelingStore) -> None:
    store.create_project(_project())
    _import(store, [_item("a1")])
    mine = _submit(store, "a1", "ann", ("pos",))
    _submit(store, "a1", "bob", ("pos",))

    def update(annotator_id: str, annotation_id: str = mine.annotation_id) -> m.Annotation:
        return store.update_annotation(
            ORG, "p1", annotation_id, annotator_id, labels=("neg",), spans=(), comment="c", now=T0, consensus=SINGLE
        )

    with pytest.raises(PermissionDeniedError, match="only its author"):
        update("bob")
    with pytest.raises(NotFoundError):
        update("ann", "nope")
    updated = update("ann")
    assert updated.labels == ("neg",) and updated.comment == "c"
    item = store.get_item(ORG, "p1", "a1")
    assert item.status is m.ItemStatus.CONFLICT and item.consensus.tied


def test_a_skipped_item_is_never_offered_to_that_annotator_again(store: LabelingStore) -> None:
    project = store.create_project(_project(task_ordering=m.TaskOrdering.SEQUENTIAL))
    _import(store, [_item("a1"), _item("a2")])
    task = _lease(store, project, "ann")
    assert task is not None and task.item.item_id == "a1"
    with pytest.raises(FailedPreconditionError, match="leased to annotator 'ann'"):
        store.skip_task(ORG, "p1", task.task_id, "bob", "", T0)
    with pytest.raises(NotFoundError):
        store.skip_task(ORG, "p1", "nope", "ann", "", T0)
    store.skip_task(ORG, "p1", task.task_id, "ann", "unclear", T0)
    store.skip_task(ORG, "p1", task.task_id, "ann", "unclear", T0)  # a retry changes nothing
    nxt = _lease(store, project, "ann")
    assert nxt is not None and nxt.item.item_id == "a2"
    other = _lease(store, project, "bob")
    assert other is not None and other.item.item_id == "a1"


def test_offers_follow_the_rule_order(store: LabelingStore) -> None:
    project = store.create_project(_project(annotations_per_item=1))
    keys = {"a1": 5, "a2": 1_000_000_007, "a3": 77, "a4": 2_000_000_000}
    _import(store, [_item(item_id, shuffle_key=key) for item_id, key in keys.items()])
    offer = _offer(project, "ann")
    expected = sorted(keys, key=lambda item_id: order_key(keys[item_id], offer.multiplier, offer.offset))
    task = _lease(store, project, "ann")
    assert task is not None and task.item.item_id == expected[0]

    uncertain = replace(project, settings=replace(project.settings, task_ordering=m.TaskOrdering.UNCERTAINTY_FIRST))
    store.attach_predictions(
        ORG,
        "p1",
        [
            (PredictionTarget(item_id=i), m.Prediction("clf", 1, ("pos",), {"pos": p}, T0))
            for i, p in (("a3", 0.9), ("a4", 0.55))
        ],
    )
    # Lowest top probability first, items without a prediction last (in import order).
    by_uncertainty = [item_id for item_id in ("a4", "a3", "a1", "a2") if item_id != expected[0]]
    leased = [_lease(store, uncertain, name) for name in ("b1", "b2")]
    assert [t.item.item_id for t in leased if t is not None] == by_uncertainty[:2]


def test_a_resolution_overrides_the_vote_and_closes_the_item(store: LabelingStore) -> None:
    project = store.create_project(_project(task_ordering=m.TaskOrdering.SEQUENTIAL))
    _import(store, [_item("a1")])
    _submit(store, "a1", "ann", ("pos",))
    _submit(store, "a1", "bob", ("neg",))
    assert store.get_item(ORG, "p1", "a1").status is m.ItemStatus.CONFLICT
    resolved = store.resolve_item(ORG, "p1", "a1", "rev", ["neg"], "checked", T0, consensus=SINGLE)
    assert resolved.status is m.ItemStatus.RESOLVED and resolved.consensus.labels == ("neg",)
    assert resolved.consensus.resolved_by == "rev" and len(resolved.annotations) == 2
    assert _lease(store, project, "cy") is None
    with pytest.raises(NotFoundError):
        store.resolve_item(ORG, "p1", "zz", "rev", ["neg"], "", T0, consensus=SINGLE)


def test_rated_items_for_agreement(store: LabelingStore) -> None:
    store.create_project(_project())
    _import(store, [_item("a1"), _item("a2"), _item("a3")])
    for annotator, labels in (("ann", ("pos", "neg")), ("bob", ("pos", "pos"))):
        for item_id, label in zip(("a1", "a2"), labels, strict=True):
            _submit(store, item_id, annotator, (label,))
    rated, counts, by_status = store.rated_items(ORG, "p1", [])
    assert [(r.item_id, r.ratings, r.consensus) for r in rated] == [
        ("a1", {"ann": ("pos",), "bob": ("pos",)}, ("pos",)),
        ("a2", {"ann": ("neg",), "bob": ("pos",)}, ()),
    ]
    assert counts == {"ann": 2, "bob": 2}
    assert by_status == {m.ItemStatus.LABELED: 1, m.ItemStatus.CONFLICT: 1, m.ItemStatus.UNLABELED: 1}
    only_bob, bob_counts, _ = store.rated_items(ORG, "p1", ["bob"])
    assert len(only_bob) == 2 and bob_counts == {"bob": 2}


# ----------------------------------------------------------------------------- dataset versions


def _version(number: int, *, version_id: str = "", content: str = "c" * 64) -> m.DatasetVersion:
    ref = m.ObjectRef(f"datasets/p1/v{number}/train.jsonl", "a" * 64, 10)
    return m.DatasetVersion(
        dataset_version_id=version_id or f"dv{number}",
        organization_id=ORG,
        project_id="p1",
        version_number=number,
        task_type=m.TaskType.TEXT_CLASSIFICATION,
        schema_version=1,
        label_map=("neg", "pos"),
        ratios=m.SplitRatios(),
        seed=7,
        split_strategy=m.SplitStrategy.STRATIFIED,
        splits=(m.SplitSummary(m.Split.TRAIN, 1, {"neg": 0, "pos": 1}, ref),),
        manifest=m.ObjectRef("datasets/p1/manifest.json", "b" * 64, 5),
        content_sha256=content,
        description="first",
        create_time=T0,
    )


def _pending_events(database: Database) -> int:
    with database.transaction() as session:
        return Outbox.pending(session)


def test_dataset_versions_are_numbered_immutable_and_announced_in_their_transaction(
    store: LabelingStore, database: Database
) -> None:
    store.create_project(_project())
    one = ConsensusRule(required=1, multi_label=False)
    _import(store, [_item("a1", labels=("pos",)), _item("a2"), _item("a3", labels=("neg",))], consensus=one)
    assert [(d.item_id, d.labels) for d in store.consensus_items(ORG, "p1")] == [("a1", ("pos",)), ("a3", ("neg",))]
    assert store.next_version_number(ORG, "p1") == 1
    v1 = store.add_dataset_version(_version(1))
    assert _pending_events(database) == 1
    assert store.next_version_number(ORG, "p1") == 2
    assert store.get_dataset_version(ORG, "p1", dataset_version_id="dv1") == v1
    assert store.get_dataset_version(ORG, "p1", version_number=1) == v1
    assert store.find_dataset_version(ORG, "p1", "c" * 64) == v1
    assert store.find_dataset_version(ORG, "p1", "d" * 64) is None
    # A second version under a taken number is refused, announces nothing and leaves the first one as it was.
    with pytest.raises(AbortedError, match="published concurrently"):
        store.add_dataset_version(replace(_version(1, version_id="dv-other", content="d" * 64), description="x"))
    assert _pending_events(database) == 1
    assert store.get_dataset_version(ORG, "p1", version_number=1) == v1
    store.add_dataset_version(_version(2, content="e" * 64))
    assert [v.version_number for v in store.list_dataset_versions(ORG, "p1", offset=0, limit=10)] == [2, 1]
    assert [v.version_number for v in store.list_dataset_versions(ORG, "p1", offset=1, limit=1)] == [1]
    assert store.get_project(ORG, "p1").stats.dataset_version_count == 2
    with pytest.raises(NotFoundError, match="dataset version number 9"):
        store.get_dataset_version(ORG, "p1", version_number=9)
    with pytest.raises(NotFoundError):
        store.get_dataset_version(ORG, "p1", dataset_version_id="nope")
