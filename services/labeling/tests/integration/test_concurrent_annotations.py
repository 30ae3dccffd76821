"""Annotators submitting for the same items at once, on the real PostgreSQL server (READ COMMITTED).

SQLite serialises writers, so these races only show on PostgreSQL: two submits for one item each counted only
their own annotation (the later commit stored a count of one, and the item was offered again), and locking the
item with FOR UPDATE deadlocked against the foreign-key lock of the annotation just inserted, and NextTask
answered "no task" while the last items were locked by submits being written (SKIP LOCKED), so an annotator
who stopped there left them short of annotations.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.events.payloads import LabelingEvents
from gristmill.labeling.store import tables
from gristmill.labeling.store.sql import SqlLabelingStore
from tests.support.databases import fresh_postgres_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITEMS = 120
ANNOTATORS = 4


@pytest.fixture
def postgres() -> Iterator[Database]:
    for url in fresh_postgres_database():
        database = Database(url)
        database.create_all(tables.metadata)
        yield database
        database.dispose()


def test_concurrent_submits_for_one_item_count_every_annotation(postgres: Database, tmp_path: Path) -> None:
    store = SqlLabelingStore(postgres, events=LabelingEvents(platform_catalog()))
    service = LabelingService(store, LocalObjectStore(tmp_path / "objects"))
    service.create_project(
        "",
        project_id="p1",
        display_name="p1",
        description="",
        task_type=m.TaskType.TEXT_CLASSIFICATION,
        labels=[m.LabelDefinition("neg"), m.LabelDefinition("pos")],
        settings=m.ProjectSettings(cleaning=m.CleaningSettings(), annotations_per_item=ANNOTATORS),
    )
    rows = (json.dumps({"external_id": f"e{i}", "text": f"review {i} {uuid.uuid4().hex}"}) for i in range(ITEMS))
    session = service.begin_import("", m.ImportOptions(project_id="p1", format=m.ImportFormat.JSONL))
    assert not isinstance(session, m.ImportReport)
    session.feed_chunk(("\n".join(rows) + "\n").encode())
    service.finish_import(session)
    errors: list[BaseException] = []

    def annotate(name: str) -> None:
        try:
            # Every annotator takes the same items in the same order (sequential offer): submits collide. Each
            # stops at the first "no task", as the demo's annotators do: an item whose row a submit has locked
            # must not be skipped into that answer.
            while True:
                task, _ = service.next_task("", "p1", name, None)
                if task is None:
                    return
                service.submit_annotation(
                    "", "p1", task.item.item_id, name, task_id=task.task_id, labels=["pos"], spans=[], comment=""
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=annotate, args=(f"a{i}",)) for i in range(ANNOTATORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    with postgres.engine.connect() as conn:
        counted = select(func.count()).where(tables.annotations.c.item_seq == tables.items.c.seq).scalar_subquery()
        wrong = conn.execute(select(func.count()).where(tables.items.c.annotation_count != counted)).scalar_one()
        total = conn.execute(select(func.count()).select_from(tables.annotations)).scalar_one()
    assert (wrong, total) == (0, ITEMS * ANNOTATORS)
