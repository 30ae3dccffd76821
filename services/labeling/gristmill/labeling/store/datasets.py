"""SQL store of published dataset versions: immutable once recorded, announced through the outbox."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.errors import AbortedError, NotFoundError
from gristmill.labeling.domain.model import DatasetVersion, ItemStatus, Response
from gristmill.labeling.domain.ports import DatasetStore
from gristmill.labeling.domain.splits import DatasetItem
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.queries import SqlStore, chunks, project_row
from gristmill.labeling.store.rows import is_generative, response_from_json, version_from_row, version_values


class DatasetEvents(Protocol):
    """Writes labeling's events into the outbox of ``session`` (implemented in ``labeling.events``)."""

    def dataset_version_published(self, session: Session, version: DatasetVersion) -> None: ...


class SqlDatasetStore(SqlStore, DatasetStore):
    # Writes a new version's ``DatasetVersionPublished`` event in the version's transaction.
    _events: DatasetEvents | None

    def consensus_items(self, organization_id: str, project_id: str) -> list[DatasetItem]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            items = t.items.c
            rows = session.execute(
                select(
                    items.seq,
                    items.item_id,
                    items.external_id,
                    items.text,
                    items.consensus_labels,
                    items.source,
                    items.resolved_response,
                )
                .where(
                    items.project_pk == project.pk,
                    items.status.in_([ItemStatus.LABELED.value, ItemStatus.RESOLVED.value]),
                )
                .order_by(items.seq)
            ).all()
            if not is_generative(project):
                return [DatasetItem(r.item_id, r.external_id, r.text, tuple(r.consensus_labels)) for r in rows]
            # A conversation's row is made from its annotations' responses (the reply, the ranking).
            responses: dict[int, list[Response]] = {}
            notes = t.annotations.c
            for chunk in chunks([r.seq for r in rows]):
                for seq, value in session.execute(
                    select(notes.item_seq, notes.response)
                    .where(notes.item_seq.in_(chunk), notes.response.is_not(None))
                    .order_by(notes.create_time, notes.annotation_id)
                ):
                    response = response_from_json(value)
                    if response is not None:
                        responses.setdefault(seq, []).append(response)
            return [
                DatasetItem(
                    r.item_id,
                    r.external_id,
                    r.text,
                    tuple(r.consensus_labels),
                    source=r.source,
                    responses=tuple(responses.get(r.seq, ())),
                    resolved_response=response_from_json(r.resolved_response),
                )
                for r in rows
            ]

    def find_dataset_version(self, organization_id: str, project_id: str, content_sha256: str) -> DatasetVersion | None:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            row = session.execute(
                select(t.dataset_versions)
                .where(
                    t.dataset_versions.c.project_pk == project.pk, t.dataset_versions.c.content_sha256 == content_sha256
                )
                .order_by(t.dataset_versions.c.version_number)
            ).first()
            return None if row is None else version_from_row(row, project)

    def next_version_number(self, organization_id: str, project_id: str) -> int:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            top = session.execute(
                select(func.max(t.dataset_versions.c.version_number)).where(
                    t.dataset_versions.c.project_pk == project.pk
                )
            ).scalar()
            return int(top or 0) + 1

    def add_dataset_version(self, version: DatasetVersion) -> DatasetVersion:
        try:
            with self.database.transaction() as session:
                project = project_row(session, version.organization_id, version.project_id)
                session.execute(insert(t.dataset_versions).values(version_values(version, project.pk)))
                if self._events is not None:
                    self._events.dataset_version_published(session, version)
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
            project = project_row(session, organization_id, project_id)
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
            return version_from_row(row, project)

    def list_dataset_versions(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[DatasetVersion]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.dataset_versions)
                .where(t.dataset_versions.c.project_pk == project.pk)
                .order_by(t.dataset_versions.c.version_number.desc())
                .offset(offset)
                .limit(limit)
            )
            return [version_from_row(row, project) for row in rows]
