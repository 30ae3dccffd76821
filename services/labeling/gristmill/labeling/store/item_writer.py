"""The import writer: many-row inserts of items (with their imported labels and predictions) in one transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.errors import AbortedError
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.ids import random_id
from gristmill.labeling.domain.model import Consensus, ImportReport, ItemSource, ItemStatus
from gristmill.labeling.domain.ports import ItemWriter, NewItem, StoredRange
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.queries import chunks, put_prediction
from gristmill.labeling.store.rows import report_to_json, response_to_json


class SqlItemWriter(ItemWriter):
    """Writes of one import (or one active-learning insert) on a session its caller commits."""

    def __init__(self, session: Session, project: Row[Any], now: datetime, consensus: ConsensusRule) -> None:
        self.session = session
        self.project = project
        self.now = now
        self._bulk = _BulkInsert(session.get_bind().dialect)
        self._now = self._bulk.datetime(now)
        # Sequence numbers only grow: this writer's rows are all above the largest one now.
        self._last_seq = int(session.execute(select(func.max(t.items.c.seq))).scalar() or 0)
        self._high_seq = self._last_seq
        self._consensus_cache: dict[tuple[str, ...], tuple[ItemStatus, Consensus]] = {}
        self.consensus = consensus
        self._first_seq: int | None = None
        self._count = 0

    @property
    def added_count(self) -> int:
        """Items this writer added so far."""
        return self._count

    def existing_external_ids(self, external_ids: Sequence[str]) -> set[str]:
        return {row[0] for row in self._rows_where_in(("external_id",), "external_id", external_ids)}

    def existing_hashes(self, text_hashes: Sequence[str]) -> dict[str, str]:
        return {row[0]: row[1] for row in self._rows_where_in(("text_hash", "item_id"), "text_hash", text_hashes)}

    def _rows_where_in(self, columns: Sequence[str], key: str, values: Sequence[str]) -> list[Any]:
        """The project's items whose ``key`` is one of ``values``: ``columns`` of each, in chunks.

        On SQLite as plain SQL (an import asks this for every record, and SQLAlchemy's per-value IN
        handling was a visible share of it); elsewhere through an expanding IN.
        """
        rows: list[Any] = []
        for chunk in chunks(values):
            if self._bulk.raw:
                # item_id is unique on its own: "+project_pk" keeps SQLite's planner on the item_id index
                # instead of scanning the project's rows through a (project_pk, ...) index.
                project = "+project_pk" if key == "item_id" else "project_pk"
                sql = (
                    f"SELECT {', '.join(columns)} FROM {t.items.name} "
                    f"WHERE {project} = ? AND {key} IN ({', '.join('?' * len(chunk))})"
                )
                rows += self.session.connection().exec_driver_sql(sql, (self.project.pk, *chunk)).all()
            else:
                query = select(*(t.items.c[name] for name in columns)).where(
                    t.items.c.project_pk == self.project.pk,
                    t.items.c[key].in_(bindparam("values", expanding=True)),
                )
                rows += self.session.execute(query, {"values": chunk}).all()
        return rows

    def signatures_of(self, item_ids: Sequence[str]) -> dict[str, bytes]:
        rows = self._rows_where_in(("item_id", "signature"), "item_id", item_ids)
        return {item_id: bytes(signature) for item_id, signature in rows if signature is not None}

    def add_items(self, items: Sequence[NewItem], *, source: ItemSource, import_id: str, annotator_id: str) -> None:
        if not items:
            return
        try:
            self._add_items(items, source=source, import_id=import_id, annotator_id=annotator_id)
        except IntegrityError:
            raise concurrent_import() from None

    def _add_items(self, items: Sequence[NewItem], *, source: ItemSource, import_id: str, annotator_id: str) -> None:
        pk = self.project.pk
        bulk = self._bulk
        rows = []
        for item in items:
            status, consensus = self._consensus_of(item.labels)
            rows.append(
                (
                    item.item_id,
                    pk,
                    item.external_id,
                    item.text,
                    item.text_hash,
                    item.signature,
                    bulk.json_object(item.metadata),
                    status.value,
                    source.value,
                    import_id,
                    item.near_duplicate_of_item_id,
                    1 if item.labels else 0,
                    bulk.json_list(consensus.labels),
                    consensus.agreement,
                    consensus.tied,
                    "",
                    None,
                    "",
                    item.shuffle_key,
                    item.prediction.top_probability if item.prediction is not None else None,
                    self._now,
                )
            )
        self._bulk.insert(self.session, _ITEM_COLUMNS, rows)
        self._count += len(items)
        # The rows just inserted are this import's above the last sequence number seen: a range scan of
        # the primary key, which also gives the stored range without an index on import_id.
        labeled = {item.item_id for item in items if item.labels or item.prediction is not None}
        seqs: dict[str, int] = {}
        for item_id, seq in self.session.execute(
            select(t.items.c.item_id, t.items.c.seq).where(
                t.items.c.seq > self._last_seq, t.items.c.import_id == import_id
            )
        ):
            self._first_seq = seq if self._first_seq is None else min(self._first_seq, seq)
            self._high_seq = max(self._high_seq, seq)
            if item_id in labeled:
                seqs[item_id] = seq
        self._last_seq = self._high_seq
        if not labeled:
            return
        notes = [
            (
                random_id(),
                pk,
                seqs[item.item_id],
                annotator_id,
                bulk.json_list(item.labels),
                bulk.json_list(()),
                "",
                bulk.json_value(response_to_json(item.response)),
                self.project.schema_version,
                self._now,
                self._now,
            )
            for item in items
            if item.labels
        ]
        self._bulk.insert(self.session, _ANNOTATION_COLUMNS, notes)
        for item in items:
            if item.prediction is not None:
                put_prediction(self.session, seqs[item.item_id], item.prediction)

    def _consensus_of(self, labels: tuple[str, ...]) -> tuple[ItemStatus, Consensus]:
        # Imported items share a handful of label sets: compute each one's consensus once.
        cached = self._consensus_cache.get(labels)
        if cached is None:
            if labels:
                result = self.consensus.decide([labels])
                cached = (result.status, result.consensus)
            else:
                cached = (ItemStatus.UNLABELED, Consensus())
            self._consensus_cache[labels] = cached
        return cached

    def finish(self, report: ImportReport | None, request_id: str) -> StoredRange:
        try:
            if report is not None:
                self.session.execute(
                    insert(t.imports).values(
                        import_id=report.import_id,
                        project_pk=self.project.pk,
                        request_id=request_id or None,
                        source_name=report.source_name,
                        report=report_to_json(report),
                        create_time=report.create_time,
                    )
                )
            self.session.flush()
        except IntegrityError:
            raise concurrent_import() from None
        if not self._count or self._first_seq is None:
            return StoredRange(0, 0, 0)
        return StoredRange(self._first_seq, self._high_seq, self._count)


_ITEM_COLUMNS = (
    t.items,
    (
        "item_id",
        "project_pk",
        "external_id",
        "text",
        "text_hash",
        "signature",
        "metadata",
        "status",
        "source",
        "import_id",
        "near_duplicate_of",
        "annotation_count",
        "consensus_labels",
        "consensus_agreement",
        "consensus_tied",
        "resolved_by",
        "resolved_labels",
        "resolution_comment",
        "shuffle_key",
        "top_probability",
        "create_time",
    ),
)
_ANNOTATION_COLUMNS = (
    t.annotations,
    (
        "annotation_id",
        "project_pk",
        "item_seq",
        "annotator_id",
        "labels",
        "spans",
        "comment",
        "response",
        "schema_version",
        "create_time",
        "update_time",
    ),
)


class _BulkInsert:
    """Many-row inserts for imports, where most of an import's time goes.

    On SQLite the rows go to the driver's ``executemany`` as tuples whose values are already what
    SQLAlchemy would bind: JSON encoded once per distinct value (``json``), datetimes through the column
    type's own SQLite bind processor (``datetime``); str, int, float, bool, bytes and None bind natively.
    That skips SQLAlchemy's per-row parameter processing; the stored values are the same as a Core
    insert's. Other back-ends get a Core insert with the Python values (their drivers need the types).
    """

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        self.raw = dialect.name == "sqlite"
        self._json_cache: dict[tuple[str, ...], str] = {}

    def datetime(self, value: datetime) -> Any:
        if not self.raw:
            return value
        processor = t.items.c.create_time.type.dialect_impl(self.dialect).bind_processor(self.dialect)
        return value if processor is None else processor(value)

    def json_list(self, values: Sequence[str]) -> Any:
        if not self.raw:
            return list(values)
        key = tuple(values)
        found = self._json_cache.get(key)
        if found is None:
            found = self._json_cache[key] = json.dumps(list(values))
        return found

    def json_value(self, value: Any) -> Any:
        """A nullable JSON column's value (None stays SQL NULL)."""
        if not self.raw or value is None:
            return value
        return json.dumps(value)

    def json_object(self, value: dict[str, str]) -> Any:
        if not self.raw:
            return value
        return json.dumps(value) if value else "{}"

    def insert(self, session: Session, columns: tuple[Any, tuple[str, ...]], rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        table, names = columns
        if not self.raw:
            session.execute(insert(table), [dict(zip(names, row, strict=True)) for row in rows])
            return
        placeholders = ", ".join("?" * len(names))
        session.connection().exec_driver_sql(
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({placeholders})", list(rows)
        )


def concurrent_import() -> AbortedError:
    return AbortedError(
        "another import stored some of the same records (or used the same request_id) at the same time; "
        "retry the import"
    )
