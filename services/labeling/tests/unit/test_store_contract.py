"""The LabelingStore conformance suite: what every implementation must do, run over each one.

Only the SQL store exists (SQLite here; PostgreSQL takes the same suite by URL). A new implementation
adds a subclass with its own ``store`` fixture.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gristmill.core.errors import AbortedError, AlreadyExistsError, FailedPreconditionError, NotFoundError
from gristmill.core.sql import Database
from gristmill.labeling.domain import model as m
from gristmill.labeling.store.base import LabelingStore, NewItem
from gristmill.labeling.store.sql import SqlLabelingStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _project(project_id: str = "p1", *, labels: tuple[str, ...] = ("neg", "pos"), at: datetime = T0) -> m.Project:
    schema = m.LabelSchema(project_id, 1, tuple(m.LabelDefinition(n, f"{n} text") for n in labels), at)
    return m.Project(
        organization_id="default",
        project_id=project_id,
        display_name=project_id.upper(),
        description="d",
        task_type=m.TaskType.TEXT_CLASSIFICATION,
        label_schema=schema,
        settings=m.ProjectSettings(annotations_per_item=2, task_ordering=m.TaskOrdering.RANDOM),
        create_time=at,
        update_time=at,
    )


def _item(item_id: str, text: str, *, labels: tuple[str, ...] = ()) -> NewItem:
    return NewItem(
        item_id=item_id,
        external_id=f"ext-{item_id}",
        text=text,
        text_hash=f"{item_id:0>64}",
        signature=None,
        metadata={"k": "v"},
        near_duplicate_of_item_id="",
        shuffle_key=1,
        labels=labels,
    )


class LabelingStoreContract:
    @pytest.fixture
    def store(self) -> LabelingStore:
        raise NotImplementedError

    def test_create_and_get_project_with_its_first_schema(self, store: LabelingStore) -> None:
        created = store.create_project(_project())
        assert created.project_id == "p1" and created.organization_id == "default"
        assert created.label_schema.version == 1
        assert created.label_schema.labels == (
            m.LabelDefinition("neg", "neg text"),
            m.LabelDefinition("pos", "pos text"),
        )
        assert created.settings == m.ProjectSettings(annotations_per_item=2, task_ordering=m.TaskOrdering.RANDOM)
        assert created.create_time == T0
        assert store.get_project("default", "p1") == created
        assert created.stats == m.ProjectStats()

    def test_project_ids_are_unique_per_organisation(self, store: LabelingStore) -> None:
        store.create_project(_project())
        with pytest.raises(AlreadyExistsError, match="'p1' already exists"):
            store.create_project(_project())
        other_org = _project()
        store.create_project(m.Project(**{**other_org.__dict__, "organization_id": "acme"}))
        assert store.get_project("acme", "p1").organization_id == "acme"

    def test_unknown_project_is_not_found(self, store: LabelingStore) -> None:
        with pytest.raises(NotFoundError, match="'nope' does not exist"):
            store.get_project("default", "nope")
        store.create_project(_project())
        with pytest.raises(NotFoundError):
            store.get_project("another-org", "p1")

    def test_list_projects_newest_first_with_offset_and_limit(self, store: LabelingStore) -> None:
        for i in range(3):
            store.create_project(_project(f"p{i}", at=T0 + timedelta(minutes=i)))
        assert [p.project_id for p in store.list_projects("default", offset=0, limit=10)] == ["p2", "p1", "p0"]
        assert [p.project_id for p in store.list_projects("default", offset=1, limit=1)] == ["p1"]
        assert store.list_projects("other", offset=0, limit=10) == []

    def test_update_project_changes_only_given_fields(self, store: LabelingStore) -> None:
        store.create_project(_project())
        later = T0 + timedelta(hours=1)
        settings = m.ProjectSettings(lease_seconds=30)
        updated = store.update_project(
            "default", "p1", display_name=None, description="new", settings=settings, now=later
        )
        assert (updated.display_name, updated.description, updated.settings) == ("P1", "new", settings)
        assert updated.update_time == later and updated.create_time == T0

    def test_schema_versions(self, store: LabelingStore) -> None:
        store.create_project(_project())
        labels = (m.LabelDefinition("neg", "neg text"), m.LabelDefinition("pos", "pos text"))
        # Equal to the current schema: no new version.
        assert store.update_label_schema("default", "p1", labels, T0).version == 1
        v2 = store.update_label_schema("default", "p1", (*labels, m.LabelDefinition("mixed")), T0 + timedelta(1))
        assert v2.version == 2 and v2.names == ("neg", "pos", "mixed")
        assert store.get_project("default", "p1").label_schema == v2
        assert store.get_label_schema("default", "p1", 1).names == ("neg", "pos")
        assert store.get_label_schema("default", "p1", None) == v2
        assert [s.version for s in store.list_label_schemas("default", "p1", offset=0, limit=10)] == [2, 1]
        with pytest.raises(NotFoundError, match="no label schema version 9"):
            store.get_label_schema("default", "p1", 9)

    def test_a_label_in_use_cannot_be_removed_but_an_unused_one_can(self, store: LabelingStore) -> None:
        store.create_project(_project(labels=("neg", "pos", "spare")))
        with store.open_import("default", "p1", T0) as writer:
            writer.add_items(
                [_item("a1", "hello", labels=("neg",))],
                source=m.ItemSource.IMPORT,
                import_id="i1",
                annotator_id="import",
            )
            writer.finish(None, "")
        with pytest.raises(FailedPreconditionError, match="label 'neg' is used by existing annotations"):
            store.update_label_schema("default", "p1", (m.LabelDefinition("pos"), m.LabelDefinition("spare")), T0)
        v2 = store.update_label_schema("default", "p1", (m.LabelDefinition("neg"), m.LabelDefinition("pos")), T0)
        assert v2.names == ("neg", "pos")

    def test_import_writer_is_one_transaction(self, store: LabelingStore) -> None:
        store.create_project(_project())
        with pytest.raises(RuntimeError), store.open_import("default", "p1", T0) as writer:
            writer.add_items([_item("a1", "one")], source=m.ItemSource.IMPORT, import_id="i1", annotator_id="x")
            raise RuntimeError("client went away")
        assert store.get_project("default", "p1").stats.item_count == 0
        with store.open_import("default", "p1", T0) as writer:
            writer.add_items(
                [_item("a1", "one"), _item("a2", "two")], source=m.ItemSource.IMPORT, import_id="i2", annotator_id="x"
            )
            stored = writer.finish(None, "")
        assert stored.count == 2 and stored.last_seq - stored.first_seq == 1
        with store.open_import("default", "p1", T0) as writer:
            assert writer.existing_external_ids(["ext-a1", "ext-zz"]) == {"ext-a1"}
            assert writer.existing_hashes([f"{'a2':0>64}", "f" * 64]) == {f"{'a2':0>64}": "a2"}

    def test_a_concurrent_duplicate_aborts_the_whole_import(self, store: LabelingStore) -> None:
        store.create_project(_project())
        with store.open_import("default", "p1", T0) as writer:
            writer.add_items([_item("a1", "one")], source=m.ItemSource.IMPORT, import_id="i1", annotator_id="x")
            writer.finish(None, "")
        with pytest.raises(AbortedError, match="retry the import"), store.open_import("default", "p1", T0) as writer:
            clash = NewItem(**{**_item("a9", "nine").__dict__, "external_id": "ext-a1"})
            writer.add_items([_item("a2", "two"), clash], source=m.ItemSource.IMPORT, import_id="i2", annotator_id="x")
            writer.finish(None, "")
        assert store.get_project("default", "p1").stats.item_count == 1


class TestSqliteLabelingStore(LabelingStoreContract):
    @pytest.fixture
    def store(self, database: Database) -> LabelingStore:
        return SqlLabelingStore(database)
