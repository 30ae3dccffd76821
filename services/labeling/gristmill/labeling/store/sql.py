"""SQLAlchemy implementation of ``LabelingStore`` (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, bindparam, case, delete, exists, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
)
from gristmill.core.events import Event, Outbox
from gristmill.core.ids import new_id
from gristmill.core.sql import Database
from gristmill.labeling.domain.agreement import RatedItem
from gristmill.labeling.domain.consensus import compute_consensus
from gristmill.labeling.domain.ids import random_id
from gristmill.labeling.domain.model import (
    ActiveLearningSettings,
    Annotation,
    CleaningSettings,
    Consensus,
    CustomPiiPattern,
    DatasetVersion,
    DroppedRecord,
    DropReason,
    ImportReport,
    Item,
    ItemSource,
    ItemStatus,
    LabelDefinition,
    LabelSchema,
    NearDuplicatePolicy,
    ObjectRef,
    PiiKind,
    PiiSettings,
    Prediction,
    Project,
    ProjectSettings,
    ProjectStats,
    SpanLabel,
    Split,
    SplitRatios,
    SplitStrategy,
    SplitSummary,
    Task,
    TaskOrdering,
    TaskType,
)
from gristmill.labeling.domain.ordering import PRIME, annotator_permutation
from gristmill.labeling.domain.schema import check_schema_change
from gristmill.labeling.domain.splits import DatasetItem
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.base import (
    ItemWriter,
    LabelingStore,
    NewItem,
    PredictionTarget,
    StoredRange,
)

# Rows per IN (...) lookup: well under SQLite's 32,766 bound parameters.
_IN_CHUNK = 900

Announce = Callable[[DatasetVersion], Event]


class SqlLabelingStore(LabelingStore):
    """``announce`` turns a new dataset version into its ``DatasetVersionPublished`` event (outbox)."""

    def __init__(self, database: Database, *, announce: Announce | None = None) -> None:
        self.database = database
        self._announce = announce
        # Leasing reads candidates, then writes a lease: serialised so that two annotators never take the
        # last free slot of an item at once (PostgreSQL additionally locks the chosen row).
        self._lease_lock = threading.Lock()

    # ------------------------------------------------------------------------- helpers

    def _project_row(self, session: Session, organization_id: str, project_id: str) -> Row[Any]:
        row = session.execute(
            select(t.projects).where(
                t.projects.c.organization_id == organization_id, t.projects.c.project_id == project_id
            )
        ).first()
        if row is None:
            raise NotFoundError(f"project {project_id!r} does not exist", details={"project_id": project_id})
        return row

    def _schema(self, session: Session, project: Row[Any], version: int | None = None) -> LabelSchema:
        wanted = project.schema_version if version is None else version
        row = session.execute(
            select(t.label_schemas).where(
                t.label_schemas.c.project_pk == project.pk, t.label_schemas.c.version == wanted
            )
        ).first()
        if row is None:
            raise NotFoundError(f"project {project.project_id!r} has no label schema version {wanted}")
        return _schema_from_row(project.project_id, row)

    def _stats(self, session: Session, project_pk: int) -> ProjectStats:
        by_status: dict[str, int] = dict(
            session.execute(
                select(t.items.c.status, func.count())
                .where(t.items.c.project_pk == project_pk)
                .group_by(t.items.c.status)
            ).all()
        )
        annotation_count = session.execute(
            select(func.count()).select_from(t.annotations).where(t.annotations.c.project_pk == project_pk)
        ).scalar_one()
        version_count = session.execute(
            select(func.count()).select_from(t.dataset_versions).where(t.dataset_versions.c.project_pk == project_pk)
        ).scalar_one()
        return ProjectStats(
            item_count=sum(by_status.values()),
            labeled_item_count=by_status.get(ItemStatus.LABELED.value, 0) + by_status.get(ItemStatus.RESOLVED.value, 0),
            conflict_item_count=by_status.get(ItemStatus.CONFLICT.value, 0),
            annotation_count=int(annotation_count),
            dataset_version_count=int(version_count),
        )

    def _project(self, session: Session, row: Row[Any], *, with_stats: bool = True) -> Project:
        return Project(
            organization_id=row.organization_id,
            project_id=row.project_id,
            display_name=row.display_name,
            description=row.description,
            task_type=TaskType(row.task_type),
            label_schema=self._schema(session, row),
            settings=settings_from_json(row.settings),
            create_time=row.create_time,
            update_time=row.update_time,
            stats=self._stats(session, row.pk) if with_stats else ProjectStats(),
        )

    def _item_row(self, session: Session, project_pk: int, item_id: str) -> Row[Any]:
        row = session.execute(
            select(t.items).where(t.items.c.project_pk == project_pk, t.items.c.item_id == item_id)
        ).first()
        if row is None:
            raise NotFoundError(f"item {item_id!r} does not exist in this project", details={"item_id": item_id})
        return row

    def _annotations(self, session: Session, item_seqs: Sequence[int]) -> dict[int, list[Annotation]]:
        found: dict[int, list[Annotation]] = {}
        for chunk in _chunks(item_seqs):
            rows = session.execute(
                select(t.annotations, t.items.c.item_id, t.projects.c.project_id)
                .join(t.items, t.items.c.seq == t.annotations.c.item_seq)
                .join(t.projects, t.projects.c.pk == t.annotations.c.project_pk)
                .where(t.annotations.c.item_seq.in_(chunk))
                .order_by(t.annotations.c.create_time, t.annotations.c.annotation_id)
            )
            for row in rows:
                found.setdefault(row.item_seq, []).append(_annotation_from_row(row))
        return found

    def _annotation_of(self, session: Session, item_seq: int, annotator_id: str) -> Annotation | None:
        row = session.execute(
            select(t.annotations, t.items.c.item_id, t.projects.c.project_id)
            .join(t.items, t.items.c.seq == t.annotations.c.item_seq)
            .join(t.projects, t.projects.c.pk == t.annotations.c.project_pk)
            .where(t.annotations.c.item_seq == item_seq, t.annotations.c.annotator_id == annotator_id)
        ).first()
        return None if row is None else _annotation_from_row(row)

    def _predictions(self, session: Session, item_seqs: Sequence[int]) -> dict[int, list[Prediction]]:
        found: dict[int, list[Prediction]] = {}
        for chunk in _chunks(item_seqs):
            rows = session.execute(
                select(t.predictions)
                .where(t.predictions.c.item_seq.in_(chunk))
                .order_by(t.predictions.c.create_time, t.predictions.c.model_name, t.predictions.c.model_version)
            )
            for row in rows:
                found.setdefault(row.item_seq, []).append(
                    Prediction(
                        model_name=row.model_name,
                        model_version=row.model_version,
                        labels=tuple(row.labels),
                        probabilities=dict(row.probabilities),
                        create_time=row.create_time,
                    )
                )
        return found

    def _recompute(self, session: Session, project: Row[Any], item: Row[Any]) -> None:
        """Recompute an item's annotation count, status and consensus from its annotations."""
        labelings = [
            tuple(labels)
            for (labels,) in session.execute(select(t.annotations.c.labels).where(t.annotations.c.item_seq == item.seq))
        ]
        settings = settings_from_json(project.settings)
        result = compute_consensus(
            labelings,
            required=settings.annotations_per_item,
            multi_label=TaskType(project.task_type).multi_label,
            resolved_labels=item.resolved_labels,
            resolved_by=item.resolved_by,
        )
        session.execute(
            update(t.items)
            .where(t.items.c.seq == item.seq)
            .values(annotation_count=len(labelings), **_consensus_values(result.status, result.consensus))
        )

    # ------------------------------------------------------------------------- projects and schemas

    def create_project(self, project: Project) -> Project:
        try:
            with self.database.transaction() as session:
                result = session.execute(
                    insert(t.projects)
                    .returning(t.projects.c.pk)
                    .values(
                        organization_id=project.organization_id,
                        project_id=project.project_id,
                        display_name=project.display_name,
                        description=project.description,
                        task_type=project.task_type.value,
                        settings=settings_to_json(project.settings),
                        schema_version=1,
                        create_time=project.create_time,
                        update_time=project.update_time,
                    )
                )
                pk = result.scalar_one()
                session.execute(
                    insert(t.label_schemas).values(
                        project_pk=pk,
                        version=1,
                        labels=_labels_to_json(project.label_schema.labels),
                        create_time=project.create_time,
                    )
                )
        except IntegrityError:
            raise AlreadyExistsError(
                f"project {project.project_id!r} already exists; choose another project_id",
                details={"project_id": project.project_id},
            ) from None
        return self.get_project(project.organization_id, project.project_id)

    def get_project(self, organization_id: str, project_id: str) -> Project:
        with self.database.transaction() as session:
            return self._project(session, self._project_row(session, organization_id, project_id))

    def list_projects(self, organization_id: str, *, offset: int, limit: int) -> list[Project]:
        with self.database.transaction() as session:
            rows = session.execute(
                select(t.projects)
                .where(t.projects.c.organization_id == organization_id)
                .order_by(t.projects.c.create_time.desc(), t.projects.c.pk.desc())
                .offset(offset)
                .limit(limit)
            ).all()
            return [self._project(session, row) for row in rows]

    def update_project(
        self,
        organization_id: str,
        project_id: str,
        *,
        display_name: str | None,
        description: str | None,
        settings: ProjectSettings | None,
        now: datetime,
    ) -> Project:
        with self.database.transaction() as session:
            row = self._project_row(session, organization_id, project_id)
            values: dict[str, Any] = {"update_time": now}
            if display_name is not None:
                values["display_name"] = display_name
            if description is not None:
                values["description"] = description
            if settings is not None:
                values["settings"] = settings_to_json(settings)
            session.execute(update(t.projects).where(t.projects.c.pk == row.pk).values(**values))
            return self._project(session, self._project_row(session, organization_id, project_id))

    def update_label_schema(
        self, organization_id: str, project_id: str, labels: Sequence[LabelDefinition], now: datetime
    ) -> LabelSchema:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            current = self._schema(session, project)
            if tuple(labels) == current.labels:
                return current
            check_schema_change(current.names, [label.name for label in labels], self._used_labels(session, project.pk))
            version = project.schema_version + 1
            session.execute(
                insert(t.label_schemas).values(
                    project_pk=project.pk, version=version, labels=_labels_to_json(labels), create_time=now
                )
            )
            session.execute(
                update(t.projects).where(t.projects.c.pk == project.pk).values(schema_version=version, update_time=now)
            )
            return LabelSchema(project_id, version, tuple(labels), now)

    def _used_labels(self, session: Session, project_pk: int) -> set[str]:
        used: set[str] = set()
        for (labels,) in session.execute(
            select(t.annotations.c.labels).where(t.annotations.c.project_pk == project_pk).distinct()
        ):
            used.update(labels)
        for (labels,) in session.execute(
            select(t.items.c.resolved_labels).where(
                t.items.c.project_pk == project_pk, t.items.c.resolved_labels.is_not(None)
            )
        ):
            used.update(labels or ())
        return used

    def get_label_schema(self, organization_id: str, project_id: str, version: int | None) -> LabelSchema:
        with self.database.transaction() as session:
            return self._schema(session, self._project_row(session, organization_id, project_id), version)

    def list_label_schemas(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[LabelSchema]:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.label_schemas)
                .where(t.label_schemas.c.project_pk == project.pk)
                .order_by(t.label_schemas.c.version.desc())
                .offset(offset)
                .limit(limit)
            )
            return [_schema_from_row(project_id, row) for row in rows]

    # ------------------------------------------------------------------------- imports and items

    def find_import(self, organization_id: str, project_id: str, request_id: str) -> ImportReport | None:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.imports).where(t.imports.c.project_pk == project.pk, t.imports.c.request_id == request_id)
            ).first()
            return None if row is None else report_from_json(row.report)

    def get_import(self, organization_id: str, project_id: str, import_id: str) -> ImportReport:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.imports).where(t.imports.c.project_pk == project.pk, t.imports.c.import_id == import_id)
            ).first()
            if row is None:
                raise NotFoundError(f"import {import_id!r} does not exist in project {project_id!r}")
            return report_from_json(row.report)

    def list_imports(self, organization_id: str, project_id: str, *, offset: int, limit: int) -> list[ImportReport]:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.imports.c.report)
                .where(t.imports.c.project_pk == project.pk)
                .order_by(t.imports.c.create_time.desc(), t.imports.c.import_id)
                .offset(offset)
                .limit(limit)
            )
            return [replace(report_from_json(report), drops=[]) for (report,) in rows]

    @contextmanager
    def _open_import(self, organization_id: str, project_id: str, now: datetime) -> Iterator[ItemWriter]:
        with self.database.transaction() as session:
            yield self.writer_in(session, organization_id, project_id, now)

    def open_import(self, organization_id: str, project_id: str, now: datetime) -> AbstractContextManager[ItemWriter]:
        return self._open_import(organization_id, project_id, now)

    def writer_in(self, session: Session, organization_id: str, project_id: str, now: datetime) -> ItemWriter:
        """An ``ItemWriter`` on a transaction someone else commits (an event handler's session)."""
        return _SqlItemWriter(session, self._project_row(session, organization_id, project_id), now)

    def iter_signatures(
        self, organization_id: str, project_id: str, *, after_seq: int
    ) -> Iterator[tuple[int, str, bytes]]:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
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
            project = self._project_row(session, organization_id, project_id)
            row = self._item_row(session, project.pk, item_id)
            return _item_from_row(
                row,
                project_id,
                self._annotations(session, [row.seq]).get(row.seq, []),
                self._predictions(session, [row.seq]).get(row.seq, []),
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
            project = self._project_row(session, organization_id, project_id)
            query = select(t.items).where(t.items.c.project_pk == project.pk)
            if statuses:
                query = query.where(t.items.c.status.in_([s.value for s in statuses]))
            if source is not None:
                query = query.where(t.items.c.source == source.value)
            rows = session.execute(query.order_by(t.items.c.seq).offset(offset).limit(limit)).all()
            seqs = [row.seq for row in rows]
            notes = self._annotations(session, seqs) if include_annotations else {}
            preds = self._predictions(session, seqs)
            return [_item_from_row(r, project_id, notes.get(r.seq, []), preds.get(r.seq, [])) for r in rows]

    # ------------------------------------------------------------------------- tasks and annotations

    def next_task(
        self, organization_id: str, project_id: str, annotator_id: str, *, lease_seconds: int, now: datetime
    ) -> tuple[Task | None, int]:
        with self._lease_lock, self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            settings = settings_from_json(project.settings)
            held = session.execute(
                select(t.tasks, t.items)
                .join(t.items, t.items.c.seq == t.tasks.c.item_seq)
                .where(
                    t.tasks.c.project_pk == project.pk,
                    t.tasks.c.annotator_id == annotator_id,
                    t.tasks.c.closed.is_(False),
                    t.tasks.c.expire_time > now,
                )
                .order_by(t.tasks.c.create_time)
            ).first()
            remaining = self._offerable_count(session, project, annotator_id, settings, now)
            if held is not None:
                return self._task(session, project, held, held.task_id, held.expire_time, annotator_id), remaining + 1
            query = self._offerable(project, annotator_id, settings, now).limit(1)
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=t.items)
            row = session.execute(query).first()
            if row is None:
                return None, 0
            task_id = new_id()
            expire = now + timedelta(seconds=lease_seconds)
            session.execute(
                insert(t.tasks).values(
                    task_id=task_id,
                    project_pk=project.pk,
                    item_seq=row.seq,
                    annotator_id=annotator_id,
                    expire_time=expire,
                    closed=False,
                    create_time=now,
                )
            )
            return self._task(session, project, row, task_id, expire, annotator_id), remaining

    def _task(
        self, session: Session, project: Row[Any], row: Row[Any], task_id: str, expire: datetime, annotator_id: str
    ) -> Task:
        # No annotations of others: seeing them would anchor the annotator.
        item = _item_from_row(row, project.project_id, [], self._predictions(session, [row.seq]).get(row.seq, []))
        return Task(task_id, annotator_id, item, self._schema(session, project), expire)

    def _offerable(self, project: Row[Any], annotator_id: str, settings: ProjectSettings, now: datetime) -> Any:
        """Items this annotator may be offered, by the project's ordering."""
        i = t.items
        open_leases = (
            select(func.count())
            .select_from(t.tasks)
            .where(t.tasks.c.item_seq == i.c.seq, t.tasks.c.closed.is_(False), t.tasks.c.expire_time > now)
            .scalar_subquery()
        )
        my_open_lease = exists().where(
            t.tasks.c.item_seq == i.c.seq,
            t.tasks.c.annotator_id == annotator_id,
            t.tasks.c.closed.is_(False),
            t.tasks.c.expire_time > now,
        )
        query = select(i).where(
            i.c.project_pk == project.pk,
            i.c.status != ItemStatus.RESOLVED.value,
            i.c.annotation_count + open_leases < settings.annotations_per_item,
            ~exists().where(t.annotations.c.item_seq == i.c.seq, t.annotations.c.annotator_id == annotator_id),
            ~exists().where(t.skips.c.item_seq == i.c.seq, t.skips.c.annotator_id == annotator_id),
            ~my_open_lease,
        )
        ordering = settings.task_ordering
        if ordering is TaskOrdering.RANDOM:
            multiplier, offset = annotator_permutation(project.project_id, annotator_id)
            query = query.order_by((i.c.shuffle_key * literal(multiplier) + literal(offset)) % literal(PRIME), i.c.seq)
        elif ordering is TaskOrdering.UNCERTAINTY_FIRST:
            query = query.order_by(case((i.c.top_probability.is_(None), 1), else_=0), i.c.top_probability, i.c.seq)
        else:
            query = query.order_by(i.c.seq)
        return query

    def _offerable_count(
        self, session: Session, project: Row[Any], annotator_id: str, settings: ProjectSettings, now: datetime
    ) -> int:
        sub = self._offerable(project, annotator_id, settings, now).order_by(None).subquery()
        return int(session.execute(select(func.count()).select_from(sub)).scalar_one())

    def submit_annotation(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        annotator_id: str,
        *,
        task_id: str,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
        now: datetime,
    ) -> Annotation:
        try:
            with self.database.transaction() as session:
                project = self._project_row(session, organization_id, project_id)
                item = self._item_row(session, project.pk, item_id)
                if task_id:
                    task = session.execute(
                        select(t.tasks).where(t.tasks.c.task_id == task_id, t.tasks.c.project_pk == project.pk)
                    ).first()
                    if task is None:
                        raise NotFoundError(f"task {task_id!r} does not exist in this project")
                    if task.annotator_id != annotator_id or task.item_seq != item.seq:
                        raise FailedPreconditionError(
                            f"task {task_id!r} is a lease of another annotator or item; submit with your own task_id "
                            "(or none)"
                        )
                existing = self._annotation_of(session, item.seq, annotator_id)
                if existing is not None:
                    # The same submission again is a retry (the first reply was lost: a timeout, a restart of this
                    # service): answer it as the first time. Different labels are a second opinion, refused.
                    if (existing.labels, existing.spans, existing.comment) == (tuple(labels), tuple(spans), comment):
                        return existing
                    raise _already_annotated(annotator_id, item_id, existing.annotation_id)
                annotation = Annotation(
                    annotation_id=new_id(),
                    project_id=project_id,
                    item_id=item_id,
                    annotator_id=annotator_id,
                    labels=tuple(labels),
                    schema_version=project.schema_version,
                    create_time=now,
                    update_time=now,
                    spans=tuple(spans),
                    comment=comment,
                )
                session.execute(insert(t.annotations).values(_annotation_values(annotation, project.pk, item.seq)))
                session.execute(
                    update(t.tasks)
                    .where(t.tasks.c.item_seq == item.seq, t.tasks.c.annotator_id == annotator_id)
                    .values(closed=True)
                )
                self._recompute(session, project, item)
                return annotation
        except IntegrityError:
            # The same annotator submitted concurrently for this item; the other call won.
            raise _already_annotated(annotator_id, item_id, "") from None

    def update_annotation(
        self,
        organization_id: str,
        project_id: str,
        annotation_id: str,
        annotator_id: str,
        *,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
        now: datetime,
    ) -> Annotation:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.annotations, t.items.c.item_id, literal(project_id).label("project_id"))
                .join(t.items, t.items.c.seq == t.annotations.c.item_seq)
                .where(t.annotations.c.annotation_id == annotation_id, t.annotations.c.project_pk == project.pk)
            ).first()
            if row is None:
                raise NotFoundError(f"annotation {annotation_id!r} does not exist in project {project_id!r}")
            if row.annotator_id != annotator_id:
                raise PermissionDeniedError(
                    f"annotation {annotation_id!r} belongs to annotator {row.annotator_id!r}; only its author may "
                    "change it"
                )
            updated = replace(
                _annotation_from_row(row),
                labels=tuple(labels),
                spans=tuple(spans),
                comment=comment,
                schema_version=project.schema_version,
                update_time=now,
            )
            values = _annotation_values(updated, project.pk, row.item_seq)
            session.execute(
                update(t.annotations)
                .where(t.annotations.c.annotation_id == annotation_id)
                .values({k: values[k] for k in ("labels", "spans", "comment", "schema_version", "update_time")})
            )
            self._recompute(
                session, project, session.execute(select(t.items).where(t.items.c.seq == row.item_seq)).one()
            )
            return updated

    def skip_task(
        self, organization_id: str, project_id: str, task_id: str, annotator_id: str, reason: str, now: datetime
    ) -> None:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            task = session.execute(
                select(t.tasks).where(t.tasks.c.task_id == task_id, t.tasks.c.project_pk == project.pk)
            ).first()
            if task is None:
                raise NotFoundError(f"task {task_id!r} does not exist in project {project_id!r}")
            if task.annotator_id != annotator_id:
                raise FailedPreconditionError(
                    f"task {task_id!r} is leased to annotator {task.annotator_id!r}, not {annotator_id!r}"
                )
            session.execute(update(t.tasks).where(t.tasks.c.task_id == task_id).values(closed=True))
            already = session.execute(
                select(t.skips.c.item_seq).where(
                    t.skips.c.item_seq == task.item_seq, t.skips.c.annotator_id == annotator_id
                )
            ).first()
            if already is None:
                session.execute(
                    insert(t.skips).values(
                        item_seq=task.item_seq, annotator_id=annotator_id, reason=reason, create_time=now
                    )
                )

    def attach_predictions(
        self, organization_id: str, project_id: str, predictions: Sequence[tuple[PredictionTarget, Prediction]]
    ) -> int:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
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
                _put_prediction(session, seq, prediction)
            return len(predictions)

    def resolve_item(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        reviewer_id: str,
        labels: Sequence[str],
        comment: str,
        now: datetime,
    ) -> Item:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            row = self._item_row(session, project.pk, item_id)
            session.execute(
                update(t.items)
                .where(t.items.c.seq == row.seq)
                .values(resolved_labels=list(labels), resolved_by=reviewer_id, resolution_comment=comment)
            )
            self._recompute(session, project, self._item_row(session, project.pk, item_id))
            fresh = self._item_row(session, project.pk, item_id)
            return _item_from_row(
                fresh,
                project_id,
                self._annotations(session, [fresh.seq]).get(fresh.seq, []),
                self._predictions(session, [fresh.seq]).get(fresh.seq, []),
            )

    def rated_items(
        self, organization_id: str, project_id: str, annotator_ids: Sequence[str]
    ) -> tuple[list[RatedItem], dict[str, int], dict[ItemStatus, int]]:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            query = (
                select(
                    t.items.c.item_id, t.items.c.consensus_labels, t.annotations.c.annotator_id, t.annotations.c.labels
                )
                .join(t.annotations, t.annotations.c.item_seq == t.items.c.seq)
                .where(t.items.c.project_pk == project.pk)
                .order_by(t.items.c.seq)
            )
            if annotator_ids:
                query = query.where(t.annotations.c.annotator_id.in_(list(annotator_ids)))
            ratings: dict[str, dict[str, tuple[str, ...]]] = {}
            consensus: dict[str, tuple[str, ...]] = {}
            counts: Counter[str] = Counter()
            for item_id, consensus_labels, annotator, labels in session.execute(query):
                ratings.setdefault(item_id, {})[annotator] = tuple(labels)
                consensus[item_id] = tuple(consensus_labels)
                counts[annotator] += 1
            by_status: dict[str, int] = dict(
                session.execute(
                    select(t.items.c.status, func.count())
                    .where(t.items.c.project_pk == project.pk)
                    .group_by(t.items.c.status)
                ).all()
            )
            rated = [RatedItem(item_id, ratings[item_id], consensus[item_id]) for item_id in ratings]
            return rated, dict(counts), {ItemStatus(status): int(n) for status, n in by_status.items()}

    # ------------------------------------------------------------------------- dataset versions

    def consensus_items(self, organization_id: str, project_id: str) -> list[DatasetItem]:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.items.c.item_id, t.items.c.external_id, t.items.c.text, t.items.c.consensus_labels)
                .where(
                    t.items.c.project_pk == project.pk,
                    t.items.c.status.in_([ItemStatus.LABELED.value, ItemStatus.RESOLVED.value]),
                )
                .order_by(t.items.c.seq)
            )
            return [DatasetItem(r.item_id, r.external_id, r.text, tuple(r.consensus_labels)) for r in rows]

    def find_dataset_version(self, organization_id: str, project_id: str, content_sha256: str) -> DatasetVersion | None:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.dataset_versions)
                .where(
                    t.dataset_versions.c.project_pk == project.pk, t.dataset_versions.c.content_sha256 == content_sha256
                )
                .order_by(t.dataset_versions.c.version_number)
            ).first()
            return None if row is None else _version_from_row(row, project)

    def next_version_number(self, organization_id: str, project_id: str) -> int:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            top = session.execute(
                select(func.max(t.dataset_versions.c.version_number)).where(
                    t.dataset_versions.c.project_pk == project.pk
                )
            ).scalar()
            return int(top or 0) + 1

    def add_dataset_version(self, version: DatasetVersion) -> DatasetVersion:
        try:
            with self.database.transaction() as session:
                project = self._project_row(session, version.organization_id, version.project_id)
                session.execute(insert(t.dataset_versions).values(_version_values(version, project.pk)))
                if self._announce is not None:
                    Outbox.add(session, self._announce(version))
        except IntegrityError:
            raise AbortedError(
                f"dataset version {version.version_number} of project {version.project_id!r} was published "
                "concurrently; retry"
            ) from None
        return version

    def get_dataset_version(
        self, organization_id: str, project_id: str, *, dataset_version_id: str = "", version_number: int = 0
    ) -> DatasetVersion:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            query = select(t.dataset_versions).where(t.dataset_versions.c.project_pk == project.pk)
            if dataset_version_id:
                query = query.where(t.dataset_versions.c.dataset_version_id == dataset_version_id)
                what = f"dataset version {dataset_version_id!r}"
            else:
                query = query.where(t.dataset_versions.c.version_number == version_number)
                what = f"dataset version number {version_number}"
            row = session.execute(query).first()
            if row is None:
                raise NotFoundError(f"{what} does not exist in project {project_id!r}")
            return _version_from_row(row, project)

    def list_dataset_versions(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[DatasetVersion]:
        with self.database.transaction() as session:
            project = self._project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.dataset_versions)
                .where(t.dataset_versions.c.project_pk == project.pk)
                .order_by(t.dataset_versions.c.version_number.desc())
                .offset(offset)
                .limit(limit)
            )
            return [_version_from_row(row, project) for row in rows]


class _SqlItemWriter(ItemWriter):
    def __init__(self, session: Session, project: Row[Any], now: datetime) -> None:
        self.session = session
        self.project = project
        self.now = now
        self._bulk = _BulkInsert(session.get_bind().dialect)
        self._now = self._bulk.datetime(now)
        # Sequence numbers only grow: this writer's rows are all above the largest one now.
        self._last_seq = int(session.execute(select(func.max(t.items.c.seq))).scalar() or 0)
        self._high_seq = self._last_seq
        self._consensus_cache: dict[tuple[str, ...], tuple[ItemStatus, Consensus]] = {}
        self.settings = settings_from_json(project.settings)
        self.multi_label = TaskType(project.task_type).multi_label
        self._first_seq: int | None = None
        self._count = 0

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
        for chunk in _chunks(values):
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
            raise _concurrent_import() from None

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
                _put_prediction(self.session, seqs[item.item_id], item.prediction)

    def _consensus_of(self, labels: tuple[str, ...]) -> tuple[ItemStatus, Consensus]:
        # Imported items share a handful of label sets: compute each one's consensus once.
        cached = self._consensus_cache.get(labels)
        if cached is None:
            if labels:
                result = compute_consensus(
                    [labels], required=self.settings.annotations_per_item, multi_label=self.multi_label
                )
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
            raise _concurrent_import() from None
        if not self._count or self._first_seq is None:
            return StoredRange(0, 0, 0)
        return StoredRange(self._first_seq, self._high_seq, self._count)


# ----------------------------------------------------------------------------- row ↔ domain


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


def _concurrent_import() -> AbortedError:
    return AbortedError(
        "another import stored some of the same records (or used the same request_id) at the same time; "
        "retry the import"
    )


def _already_annotated(annotator_id: str, item_id: str, annotation_id: str) -> AlreadyExistsError:
    which = f" (annotation {annotation_id})" if annotation_id else ""
    return AlreadyExistsError(
        f"annotator {annotator_id!r} already annotated item {item_id!r}{which}; use UpdateAnnotation to change it",
        details={"annotation_id": annotation_id} if annotation_id else None,
    )


def _chunks(values: Sequence[Any]) -> Iterator[list[Any]]:
    values = list(values)
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _resolve_targets(
    session: Session, project_pk: int, targets: Sequence[PredictionTarget]
) -> tuple[dict[str, int], dict[str, int]]:
    by_id: dict[str, int] = {}
    by_external: dict[str, int] = {}
    for chunk in _chunks([x.item_id for x in targets if x.item_id]):
        by_id.update(
            session.execute(
                select(t.items.c.item_id, t.items.c.seq).where(
                    t.items.c.project_pk == project_pk, t.items.c.item_id.in_(chunk)
                )
            ).all()
        )
    for chunk in _chunks([x.external_id for x in targets if not x.item_id]):
        by_external.update(
            session.execute(
                select(t.items.c.external_id, t.items.c.seq).where(
                    t.items.c.project_pk == project_pk, t.items.c.external_id.in_(chunk)
                )
            ).all()
        )
    return by_id, by_external


def _put_prediction(session: Session, seq: int, prediction: Prediction) -> None:
    """Replace the model version's prediction for the item; the latest one drives uncertainty ordering."""
    session.execute(
        delete(t.predictions).where(
            and_(
                t.predictions.c.item_seq == seq,
                t.predictions.c.model_name == prediction.model_name,
                t.predictions.c.model_version == prediction.model_version,
            )
        )
    )
    session.execute(
        insert(t.predictions).values(
            item_seq=seq,
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            labels=list(prediction.labels),
            probabilities=dict(prediction.probabilities),
            create_time=prediction.create_time,
        )
    )
    session.execute(update(t.items).where(t.items.c.seq == seq).values(top_probability=prediction.top_probability))


def _consensus_values(status: ItemStatus, consensus: Consensus) -> dict[str, Any]:
    return {
        "status": status.value,
        "consensus_labels": list(consensus.labels),
        "consensus_agreement": consensus.agreement,
        "consensus_tied": consensus.tied,
    }


def _labels_to_json(labels: Sequence[LabelDefinition]) -> list[dict[str, str]]:
    return [{"name": label.name, "description": label.description} for label in labels]


def _schema_from_row(project_id: str, row: Row[Any]) -> LabelSchema:
    labels = tuple(LabelDefinition(entry["name"], entry.get("description", "")) for entry in row.labels)
    return LabelSchema(project_id, row.version, labels, row.create_time)


def _annotation_values(annotation: Annotation, project_pk: int, item_seq: int) -> dict[str, Any]:
    return {
        "annotation_id": annotation.annotation_id,
        "project_pk": project_pk,
        "item_seq": item_seq,
        "annotator_id": annotation.annotator_id,
        "labels": list(annotation.labels),
        "spans": [asdict(span) for span in annotation.spans],
        "comment": annotation.comment,
        "schema_version": annotation.schema_version,
        "create_time": annotation.create_time,
        "update_time": annotation.update_time,
    }


def _annotation_from_row(row: Row[Any]) -> Annotation:
    return Annotation(
        annotation_id=row.annotation_id,
        project_id=row.project_id,
        item_id=row.item_id,
        annotator_id=row.annotator_id,
        labels=tuple(row.labels),
        schema_version=row.schema_version,
        create_time=row.create_time,
        update_time=row.update_time,
        spans=tuple(SpanLabel(**span) for span in row.spans),
        comment=row.comment,
    )


def _item_from_row(
    row: Row[Any], project_id: str, annotations: Sequence[Annotation], predictions: Sequence[Prediction]
) -> Item:
    return Item(
        item_id=row.item_id,
        project_id=project_id,
        external_id=row.external_id,
        text=row.text,
        metadata=dict(row.metadata),
        status=ItemStatus(row.status),
        source=ItemSource(row.source),
        import_id=row.import_id,
        near_duplicate_of_item_id=row.near_duplicate_of,
        consensus=Consensus(
            labels=tuple(row.consensus_labels),
            agreement=row.consensus_agreement,
            tied=row.consensus_tied,
            resolved_by=row.resolved_by,
        ),
        create_time=row.create_time,
        annotations=tuple(annotations),
        predictions=tuple(predictions),
    )


def settings_to_json(settings: ProjectSettings) -> dict[str, Any]:
    cleaning = settings.cleaning
    return {
        "annotations_per_item": settings.annotations_per_item,
        "task_ordering": settings.task_ordering.value,
        "lease_seconds": settings.lease_seconds,
        "cleaning": {
            "max_text_chars": cleaning.max_text_chars,
            "near_duplicate_policy": cleaning.near_duplicate_policy.value,
            "near_duplicate_threshold": cleaning.near_duplicate_threshold,
            "pii": {
                "store_raw_text": cleaning.pii.store_raw_text,
                "kinds": sorted(kind.value for kind in cleaning.pii.kinds),
                "custom_patterns": [{"name": p.name, "regex": p.regex} for p in cleaning.pii.custom_patterns],
            },
        },
        "active_learning": {"import_uncertain_predictions": settings.active_learning.import_uncertain_predictions},
    }


def settings_from_json(data: dict[str, Any]) -> ProjectSettings:
    cleaning = data["cleaning"]
    pii = cleaning["pii"]
    return ProjectSettings(
        annotations_per_item=int(data["annotations_per_item"]),
        task_ordering=TaskOrdering(data["task_ordering"]),
        lease_seconds=int(data["lease_seconds"]),
        cleaning=CleaningSettings(
            max_text_chars=int(cleaning["max_text_chars"]),
            near_duplicate_policy=NearDuplicatePolicy(cleaning["near_duplicate_policy"]),
            near_duplicate_threshold=float(cleaning["near_duplicate_threshold"]),
            pii=PiiSettings(
                store_raw_text=bool(pii["store_raw_text"]),
                kinds=frozenset(PiiKind(kind) for kind in pii["kinds"]),
                custom_patterns=tuple(CustomPiiPattern(p["name"], p["regex"]) for p in pii["custom_patterns"]),
            ),
        ),
        active_learning=ActiveLearningSettings(
            import_uncertain_predictions=bool(data["active_learning"]["import_uncertain_predictions"])
        ),
    )


def report_to_json(report: ImportReport) -> dict[str, Any]:
    data = asdict(report)
    data["create_time"] = report.create_time.isoformat()
    data["drops"] = [{**asdict(drop), "reason": drop.reason.value} for drop in report.drops]
    return data


def report_from_json(data: dict[str, Any]) -> ImportReport:
    values = dict(data)
    values["create_time"] = datetime.fromisoformat(values["create_time"])
    values["drops"] = [DroppedRecord(**{**drop, "reason": DropReason(drop["reason"])}) for drop in values["drops"]]
    values["pii_masked_by_kind"] = dict(values["pii_masked_by_kind"])
    return ImportReport(**values)


def _ref_json(ref: ObjectRef) -> dict[str, Any]:
    return {"key": ref.key, "sha256": ref.sha256, "size_bytes": ref.size_bytes}


def _version_values(version: DatasetVersion, project_pk: int) -> dict[str, Any]:
    return {
        "dataset_version_id": version.dataset_version_id,
        "project_pk": project_pk,
        "version_number": version.version_number,
        "content_sha256": version.content_sha256,
        "task_type": version.task_type.value,
        "schema_version": version.schema_version,
        "label_map": list(version.label_map),
        "ratios": {"train": version.ratios.train, "validation": version.ratios.validation, "test": version.ratios.test},
        "seed": version.seed,
        "split_strategy": version.split_strategy.value,
        "splits": [
            {
                "split": s.split.value,
                "item_count": s.item_count,
                "item_count_by_label": s.item_count_by_label,
                "file": _ref_json(s.file),
            }
            for s in version.splits
        ],
        "manifest": _ref_json(version.manifest),
        "description": version.description,
        "create_time": version.create_time,
    }


def _version_from_row(row: Row[Any], project: Row[Any]) -> DatasetVersion:
    return DatasetVersion(
        dataset_version_id=row.dataset_version_id,
        organization_id=project.organization_id,
        project_id=project.project_id,
        version_number=row.version_number,
        task_type=TaskType(row.task_type),
        schema_version=row.schema_version,
        label_map=tuple(row.label_map),
        ratios=SplitRatios(**row.ratios),
        seed=row.seed,
        split_strategy=SplitStrategy(row.split_strategy),
        splits=tuple(
            SplitSummary(
                split=Split(s["split"]),
                item_count=s["item_count"],
                item_count_by_label=dict(s["item_count_by_label"]),
                file=ObjectRef(**s["file"]),
            )
            for s in row.splits
        ),
        manifest=ObjectRef(**row.manifest),
        content_sha256=row.content_sha256,
        description=row.description,
        create_time=row.create_time,
    )
