"""Dataset versions: files and manifest in the object store, the outbox event, idempotency, export."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import select

from gristmill.api.events.v1 import events_pb2
from gristmill.core.errors import DataIntegrityError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.events import OutboxEvent
from gristmill.core.events.topics import DATASET_VERSION_PUBLISHED
from gristmill.core.manifests import DatasetManifest
from gristmill.core.sql import Database
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService

WORDS = ["red", "green", "blue", "cyan", "plum", "gold", "jade", "navy", "ruby", "teal", "sand", "rose"]


def _labeled_project(make_project: Any, import_jsonl: Any, n: int = 24, **settings: Any) -> None:
    make_project(**settings)
    rows = [
        {
            "id": f"e{i}",
            "text": f"{WORDS[i % 12]} {WORDS[(i * 5 + 1) % 12]} number {i}",
            "label": "pos" if i % 3 else "neg",
        }
        for i in range(n)
    ]
    assert import_jsonl("p1", rows).accepted_count == n


def _events(database: Database) -> list[events_pb2.DatasetVersionPublished]:
    with database.transaction() as session:
        rows = session.execute(select(OutboxEvent).where(OutboxEvent.topic == DATASET_VERSION_PUBLISHED)).scalars()
        return [events_pb2.DatasetVersionPublished.FromString(row.payload) for row in rows]


def _publish(service: LabelingService, **kwargs: Any) -> tuple[m.DatasetVersion, bool]:
    args: dict[str, Any] = {
        "ratios": m.SplitRatios(0.5, 0.25, 0.25),
        "seed": 11,
        "strategy": m.SplitStrategy.STRATIFIED,
        "description": "",
    }
    args.update(kwargs)
    return service.publish_dataset_version("", "p1", **args)


def test_publish_writes_verified_files_manifest_and_one_event(
    make_project: Any, import_jsonl: Any, service: LabelingService, objects: LocalObjectStore, database: Database
) -> None:
    _labeled_project(make_project, import_jsonl)
    version, created = _publish(service, description="first")
    assert created and version.version_number == 1
    assert version.label_map == ("neg", "pos") and version.schema_version == 1
    # 8 neg and 16 pos, split 1/2, 1/4, 1/4 per label.
    counts = {s.split: (s.item_count, s.item_count_by_label) for s in version.splits}
    assert counts == {
        m.Split.TRAIN: (12, {"neg": 4, "pos": 8}),
        m.Split.VALIDATION: (6, {"neg": 2, "pos": 4}),
        m.Split.TEST: (6, {"neg": 2, "pos": 4}),
    }
    assert version.manifest.key == f"datasets/p1/{version.dataset_version_id}/manifest.json"
    manifest = DatasetManifest.from_json(
        objects.get_bytes(version.manifest.key, expected_sha256=version.manifest.sha256)
    )
    assert (manifest.project_id, manifest.dataset_version_id, manifest.version_number) == (
        "p1",
        version.dataset_version_id,
        1,
    )
    assert manifest.task_type == "TASK_TYPE_TEXT_CLASSIFICATION" and manifest.label_map == ["neg", "pos"]
    assert manifest.ratios == {"train": 0.5, "validation": 0.25, "test": 0.25} and manifest.seed == 11
    for summary in version.splits:
        entry = manifest.splits[summary.split.value]
        assert (
            entry.file.key
            == summary.file.key
            == f"datasets/p1/{version.dataset_version_id}/{summary.split.value}.jsonl"
        )
        data = objects.get_bytes(entry.file.key)
        assert hashlib.sha256(data).hexdigest() == entry.file.sha256 == summary.file.sha256
        assert entry.count == summary.item_count and entry.label_counts == summary.item_count_by_label
        rows = list(manifest.read_rows(objects, summary.split.value))
        assert len(rows) == summary.item_count and all(r.label in ("neg", "pos") for r in rows)
    (event,) = _events(database)
    assert (event.project_id, event.dataset_version_id, event.version_number) == ("p1", version.dataset_version_id, 1)
    assert event.manifest.sha256 == version.manifest.sha256 and list(event.label_map.labels) == ["neg", "pos"]
    assert sorted(s.item_count for s in event.splits) == [6, 6, 12]


def test_publishing_again_without_change_is_a_no_op(
    make_project: Any, import_jsonl: Any, service: LabelingService, objects: LocalObjectStore, database: Database
) -> None:
    _labeled_project(make_project, import_jsonl)
    first, _ = _publish(service)
    keys = [info.key for info in objects.list("datasets/")]
    again, created = _publish(service)
    assert not created and again == first
    assert [info.key for info in objects.list("datasets/")] == keys
    assert len(_events(database)) == 1
    # Other split settings are another version.
    other, created = _publish(service, seed=12)
    assert created and other.version_number == 2
    assert len(_events(database)) == 2
    versions = service.list_dataset_versions("", "p1", offset=0, limit=10)
    assert [v.version_number for v in versions] == [2, 1]
    assert service.get_dataset_version("", "p1", version_number=1) == first
    assert service.get_dataset_version("", "p1", dataset_version_id=other.dataset_version_id) == other


def test_a_labeling_change_makes_a_new_version(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    _labeled_project(make_project, import_jsonl)
    first, _ = _publish(service)
    item = service.list_items("", "p1", statuses=[], source=None, include_annotations=True, offset=0, limit=1)[0]
    service.update_annotation(
        "", "p1", item.annotations[0].annotation_id, "import", labels=["pos"], spans=(), comment=""
    )
    second, created = _publish(service)
    assert created and second.version_number == 2 and second.content_sha256 != first.content_sha256


def test_publish_preconditions(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project()
    import_jsonl("p1", [{"text": "no label yet"}])
    with pytest.raises(FailedPreconditionError, match="no item with a consensus label"):
        _publish(service)
    import_jsonl("p1", [{"text": "labeled one", "label": "pos"}])
    with pytest.raises(FailedPreconditionError, match="fewer than the 3 non-empty splits"):
        _publish(service)
    with pytest.raises(InvalidArgumentError, match="must sum to 1"):
        _publish(service, ratios=m.SplitRatios(0.5, 0.5, 0.5))
    with pytest.raises(NotFoundError):
        service.publish_dataset_version(
            "", "ghost", ratios=m.SplitRatios(), seed=0, strategy=m.SplitStrategy.STRATIFIED, description=""
        )


def test_multi_label_rows_carry_label_lists(
    make_project: Any, import_jsonl: Any, service: LabelingService, objects: LocalObjectStore
) -> None:
    make_project(labels=("bug", "ui", "billing"), multi_label=True)
    rows = [{"text": f"{WORDS[i]} issue {i}", "label": ["bug", "ui"] if i % 2 else ["billing"]} for i in range(6)]
    import_jsonl("p1", rows)
    version, _ = _publish(service, ratios=m.SplitRatios(0.5, 0.5, 0.0))
    train = next(s for s in version.splits if s.split is m.Split.TRAIN)
    lines = [json.loads(line) for line in objects.get_bytes(train.file.key).decode().splitlines()]
    assert {tuple(line["labels"]) for line in lines} <= {("bug", "ui"), ("billing",)}
    # Stratified by label combination: 3 x {bug, ui} and 3 x {billing}, each 3 * (0.5, 0.5, 0) = 1.5, 1.5, 0 →
    # largest remainder, ties to the earlier split: 2 train, 1 validation, 0 test per combination.
    assert (train.item_count, train.item_count_by_label) == (4, {"bug": 2, "ui": 2, "billing": 2})
    assert [s.item_count for s in version.splits] == [4, 2, 0]


def test_export_streams_every_file_with_its_checksum_and_refuses_tampering(
    make_project: Any, import_jsonl: Any, service: LabelingService, objects: LocalObjectStore
) -> None:
    _labeled_project(make_project, import_jsonl)
    version, _ = _publish(service)
    chunks = list(service.export_dataset("", "p1", version.dataset_version_id, []))
    files: dict[str, bytes] = {}
    for chunk in chunks:
        files[chunk.file_name] = files.get(chunk.file_name, b"") + chunk.data
        if chunk.last_chunk:
            assert chunk.sha256 == hashlib.sha256(files[chunk.file_name]).hexdigest()
            assert chunk.size_bytes == len(files[chunk.file_name])
    assert list(files) == ["manifest.json", "train.jsonl", "validation.jsonl", "test.jsonl"]
    only_test = list(service.export_dataset("", "p1", version.dataset_version_id, [m.Split.TEST]))
    assert [c.file_name for c in only_test] == ["manifest.json", "test.jsonl"]
    # Bit rot in a stored split: the export refuses it instead of sending bad data.
    test_file = next(s.file for s in version.splits if s.split is m.Split.TEST)
    (objects.root / test_file.key).write_bytes(b'{"id":"x","text":"tampered","label":"pos"}\n')
    with pytest.raises(DataIntegrityError, match="corrupted"):
        list(service.export_dataset("", "p1", version.dataset_version_id, [m.Split.TEST]))
    with pytest.raises(NotFoundError):
        service.export_dataset("", "p1", "0" * 32, [])
