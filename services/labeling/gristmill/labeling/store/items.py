"""SQL store of items, the imports that brought them and the predictions attached to them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from gristmill.core.errors import NotFoundError
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.model import ImportReport, Item, ItemSource, ItemStatus, Prediction
from gristmill.labeling.domain.ports import ItemStore, ItemWriter, PredictionTarget
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.item_writer import SqlItemWriter
from gristmill.labeling.store.queries import (
    SqlStore,
    annotations_of,
    chunks,
    item_row,
    predictions_of,
    project_row,
    put_prediction,
)
from gristmill.labeling.store.rows import is_generative, item_from_row, report_from_json

# An import of at least this many items refreshes PostgreSQL's statistics of the items table (see _open_import).
_ANALYZE_AFTER_ROWS = 1000


class SqlItemStore(SqlStore, ItemStore):
    def find_import(self, organization_id: str, project_id: str, request_id: str) -> ImportReport | None:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.imports).where(t.imports.c.project_pk == project.pk, t.imports.c.request_id == request_id)
            ).first()
            return None if row is None else report_from_json(row.report)

    def get_import(self, organization_id: str, project_id: str, import_id: str) -> ImportReport:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.imports).where(t.imports.c.project_pk == project.pk, t.imports.c.import_id == import_id)
            ).first()
            if row is None:
                raise NotFoundError(f"import {import_id!r} does not exist in project {project_id!r}")
            return report_from_json(row.report)

    def list_imports(self, organization_id: str, project_id: str, *, offset: int, limit: int) -> list[ImportReport]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.imports.c.report)
                .where(t.imports.c.project_pk == project.pk)
                .order_by(t.imports.c.create_time.desc(), t.imports.c.import_id)
                .offset(offset)
                .limit(limit)
            )
            return [replace(report_from_json(report), drops=[]) for (report,) in rows]

    @contextmanager
    def _open_import(
        self, organization_id: str, project_id: str, now: datetime, consensus: ConsensusRule
    ) -> Iterator[ItemWriter]:
        with self.database.transaction() as session:
            writer = SqlItemWriter(session, project_row(session, organization_id, project_id), now, consensus)
            yield writer
            postgres = session.get_bind().dialect.name == "postgresql"
        if postgres and writer.added_count >= _ANALYZE_AFTER_ROWS:
            # Fresh planner statistics once a large import committed: planned on the empty table's, NextTask's
            # "first offerable item" sorted every item instead of walking the primary key (18 ms against 0.1 ms
            # at 20,000 items). Autovacuum would get there, minutes later.
            with self.database.engine.connect() as connection:
                connection.execute(text(f"ANALYZE {t.items.name}"))
                connection.commit()

    def open_import(
        self, organization_id: str, project_id: str, now: datetime, *, consensus: ConsensusRule
    ) -> AbstractContextManager[ItemWriter]:
        return self._open_import(organization_id, project_id, now, consensus)

    def writer_in(
        self, session: Session, organization_id: str, project_id: str, now: datetime, *, consensus: ConsensusRule
    ) -> ItemWriter:
        """An ``ItemWriter`` on a transaction someone else commits (an event handler's session)."""
        return SqlItemWriter(session, project_row(session, organization_id, project_id), now, consensus)

    def iter_signatures(
        self, organization_id: str, project_id: str, *, after_seq: int
    ) -> Iterator[tuple[int, str, bytes]]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.items.c.seq, t.items.c.item_id, t.items.c.signature)
                .where(t.items.c.project_pk == project.pk, t.items.c.seq > after_seq, t.items.c.signature.is_not(None))
                .order_by(t.items.c.seq)
                .execution_options(yield_per=5_000)
            )
            for seq, item_id, signature in rows:
                yield int(seq), str(item_id), bytes(signature)

    def get_item(self, organization_id: str, project_id: str, item_id: str) -> Item:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            row = item_row(session, project.pk, item_id)
            return item_from_row(
                row,
                project_id,
                annotations_of(session, [row.seq]).get(row.seq, []),
                predictions_of(session, [row.seq]).get(row.seq, []),
                generative=is_generative(project),
            )

    def list_items(
        self,
        organization_id: str,
        project_id: str,
        *,
        statuses: Sequence[ItemStatus],
        source: ItemSource | None,
        include_annotations: bool,
        offset: int,
        limit: int,
    ) -> list[Item]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            query = select(t.items).where(t.items.c.project_pk == project.pk)
            if statuses:
                query = query.where(t.items.c.status.in_([s.value for s in statuses]))
            if source is not None:
                query = query.where(t.items.c.source == source.value)
            rows = session.execute(query.order_by(t.items.c.seq).offset(offset).limit(limit)).all()
            seqs = [row.seq for row in rows]
            notes = annotations_of(session, seqs) if include_annotations else {}
            preds = predictions_of(session, seqs)
            generative = is_generative(project)
            return [
                item_from_row(r, project_id, notes.get(r.seq, []), preds.get(r.seq, []), generative=generative)
                for r in rows
            ]

    def attach_predictions(
        self, organization_id: str, project_id: str, predictions: Sequence[tuple[PredictionTarget, Prediction]]
    ) -> int:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            by_id, by_external = _resolve_targets(session, project.pk, [target for target, _ in predictions])
            for target, prediction in predictions:
                if target.item_id:
                    seq = by_id.get(target.item_id)
                    what = f"item {target.item_id!r}"
                else:
                    seq = by_external.get(target.external_id)
                    what = f"item with external id {target.external_id!r}"
                if seq is None:
                    raise NotFoundError(f"{what} does not exist in project {project_id!r}; nothing was attached")
                put_prediction(session, seq, prediction)
            return len(predictions)


def _resolve_targets(
    session: Session, project_pk: int, targets: Sequence[PredictionTarget]
) -> tuple[dict[str, int], dict[str, int]]:
    by_id: dict[str, int] = {}
    by_external: dict[str, int] = {}
    for chunk in chunks([x.item_id for x in targets if x.item_id]):
        by_id.update(
            session.execute(
                select(t.items.c.item_id, t.items.c.seq).where(
                    t.items.c.project_pk == project_pk, t.items.c.item_id.in_(chunk)
                )
            ).all()
        )
    for chunk in chunks([x.external_id for x in targets if not x.item_id]):
        by_external.update(
            session.execute(
                select(t.items.c.external_id, t.items.c.seq).where(
                    t.items.c.project_pk == project_pk, t.items.c.external_id.in_(chunk)
                )
            ).all()
        )
    return by_id, by_external
