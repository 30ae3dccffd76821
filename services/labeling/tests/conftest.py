"""Fixtures of the labeling tests: the shared server fixtures, an in-process service, a controllable clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.events.payloads import LabelingEvents
from gristmill.labeling.store.sql import SqlLabelingStore
from tests.conftest import SHARED_DATA, kafka_bootstrap, s3_endpoint, tracing  # noqa: F401
from tests.support.databases import migrated_database

SENTIMENT = SHARED_DATA / "sentiment"


class FakeClock:
    """A clock the test moves by hand (leases, timestamps)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = migrated_database(f"sqlite:///{tmp_path / 'labeling.db'}", "labeling")
    yield db
    db.dispose()


@pytest.fixture
def objects(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def store(database: Database) -> SqlLabelingStore:
    return SqlLabelingStore(database, events=LabelingEvents(platform_catalog()))


@pytest.fixture
def service(store: SqlLabelingStore, objects: LocalObjectStore, clock: FakeClock) -> LabelingService:
    return LabelingService(store, objects, clock=clock)


ProjectFactory = Callable[..., m.Project]


@pytest.fixture
def make_project(service: LabelingService) -> ProjectFactory:
    """Create a project: ``make_project("p1", labels=("neg", "pos"), annotations_per_item=2, ...)``."""

    def make(
        project_id: str = "p1",
        *,
        labels: Sequence[str] = ("neg", "pos"),
        multi_label: bool = False,
        cleaning: m.CleaningSettings | None = None,
        task_type: m.TaskType | None = None,
        **settings: Any,
    ) -> m.Project:
        """``task_type`` chat or preference makes a project without labels."""
        if task_type is None:
            task_type = m.TaskType.TEXT_MULTI_LABEL_CLASSIFICATION if multi_label else m.TaskType.TEXT_CLASSIFICATION
        return service.create_project(
            "",
            project_id=project_id,
            display_name=project_id,
            description="",
            task_type=task_type,
            labels=[] if task_type.generative else [m.LabelDefinition(name) for name in labels],
            settings=m.ProjectSettings(cleaning=cleaning or m.CleaningSettings(), **settings),
        )

    return make


Importer = Callable[..., m.ImportReport]


@pytest.fixture
def import_jsonl(service: LabelingService) -> Importer:
    """Import JSON objects (dicts) or raw lines (str/bytes) as one JSONL stream, in chunks of ``chunk`` bytes."""

    def run(
        project_id: str, rows: Iterable[dict[str, Any] | str | bytes], *, chunk: int = 0, **options: Any
    ) -> m.ImportReport:
        parts = []
        for row in rows:
            if isinstance(row, dict):
                parts.append(json.dumps(row).encode())
            else:
                parts.append(row.encode() if isinstance(row, str) else row)
        data = b"\n".join(parts) + b"\n"
        session = service.begin_import(
            "", m.ImportOptions(project_id=project_id, format=m.ImportFormat.JSONL, **options)
        )
        if isinstance(session, m.ImportReport):
            return session
        try:
            size = chunk or len(data)
            for start in range(0, len(data), size):
                session.feed_chunk(data[start : start + size])
        except BaseException:
            session.close()
            raise
        return service.finish_import(session)

    return run
