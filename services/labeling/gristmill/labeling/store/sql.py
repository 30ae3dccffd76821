"""SQLAlchemy implementation of ``LabelingStore`` (SQLite file by default, PostgreSQL by URL).

One class per aggregate (``projects``, ``items``, ``annotations``, ``datasets``); this one combines them over one
``Database``.
"""

from __future__ import annotations

import threading

from gristmill.core.sql import Database
from gristmill.labeling.domain.ports import LabelingStore
from gristmill.labeling.store.annotations import SqlAnnotationStore
from gristmill.labeling.store.datasets import DatasetEvents, SqlDatasetStore
from gristmill.labeling.store.items import SqlItemStore
from gristmill.labeling.store.projects import SqlProjectStore

__all__ = ["DatasetEvents", "SqlLabelingStore"]


class SqlLabelingStore(SqlProjectStore, SqlItemStore, SqlAnnotationStore, SqlDatasetStore, LabelingStore):
    """``events`` writes a new dataset version's ``DatasetVersionPublished`` event (outbox, same transaction)."""

    def __init__(self, database: Database, *, events: DatasetEvents | None = None) -> None:
        self.database = database
        self._events = events
        self._lease_lock = threading.Lock()
