"""SQL store of projects and their label schema versions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Text, cast, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.errors import AlreadyExistsError
from gristmill.labeling.domain.model import (
    ItemStatus,
    LabelDefinition,
    LabelSchema,
    Project,
    ProjectSettings,
    ProjectStats,
    TaskType,
)
from gristmill.labeling.domain.ports import ProjectStore, SchemaChangeRule
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.queries import SqlStore, project_row, schema_of
from gristmill.labeling.store.rows import labels_to_json, schema_from_row, settings_from_json, settings_to_json


class SqlProjectStore(SqlStore, ProjectStore):
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
                        labels=labels_to_json(project.label_schema.labels),
                        create_time=project.create_time,
                    )
                )
        except IntegrityError:
            raise AlreadyExistsError(
                f"project {project.project_id!r} already exists; choose another project_id",
                details={"project_id": project.project_id},
            ) from None
        return self.get_project(project.organization_id, project.project_id)

    def get_project(self, organization_id: str, project_id: str, *, with_stats: bool = True) -> Project:
        with self.database.transaction() as session:
            return _project(session, project_row(session, organization_id, project_id), with_stats=with_stats)

    def list_projects(self, organization_id: str, *, offset: int, limit: int) -> list[Project]:
        with self.database.transaction() as session:
            rows = session.execute(
                select(t.projects)
                .where(t.projects.c.organization_id == organization_id)
                .order_by(t.projects.c.create_time.desc(), t.projects.c.pk.desc())
                .offset(offset)
                .limit(limit)
            ).all()
            return [_project(session, row) for row in rows]

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
            row = project_row(session, organization_id, project_id)
            values: dict[str, Any] = {"update_time": now}
            if display_name is not None:
                values["display_name"] = display_name
            if description is not None:
                values["description"] = description
            if settings is not None:
                values["settings"] = settings_to_json(settings)
            session.execute(update(t.projects).where(t.projects.c.pk == row.pk).values(**values))
            return _project(session, project_row(session, organization_id, project_id))

    def update_label_schema(
        self,
        organization_id: str,
        project_id: str,
        labels: Sequence[LabelDefinition],
        now: datetime,
        *,
        rule: SchemaChangeRule,
    ) -> LabelSchema:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            current = schema_of(session, project)
            if not rule(current, labels, _used_labels(session, project.pk)):
                return current
            version = project.schema_version + 1
            session.execute(
                insert(t.label_schemas).values(
                    project_pk=project.pk, version=version, labels=labels_to_json(labels), create_time=now
                )
            )
            session.execute(
                update(t.projects).where(t.projects.c.pk == project.pk).values(schema_version=version, update_time=now)
            )
            return LabelSchema(project_id, version, tuple(labels), now)

    def get_label_schema(self, organization_id: str, project_id: str, version: int | None) -> LabelSchema:
        with self.database.transaction() as session:
            return schema_of(session, project_row(session, organization_id, project_id), version)

    def list_label_schemas(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[LabelSchema]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            rows = session.execute(
                select(t.label_schemas)
                .where(t.label_schemas.c.project_pk == project.pk)
                .order_by(t.label_schemas.c.version.desc())
                .offset(offset)
                .limit(limit)
            )
            return [schema_from_row(project_id, row) for row in rows]


def _used_labels(session: Session, project_pk: int) -> set[str]:
    """Labels that annotations or reviewers' resolutions of the project use."""
    used: set[str] = set()
    # DISTINCT over the JSON text: PostgreSQL's json type has no equality operator.
    for (labels,) in session.execute(
        select(cast(t.annotations.c.labels, Text)).where(t.annotations.c.project_pk == project_pk).distinct()
    ):
        used.update(json.loads(labels))
    for (labels,) in session.execute(
        select(t.items.c.resolved_labels).where(
            t.items.c.project_pk == project_pk, t.items.c.resolved_labels.is_not(None)
        )
    ):
        used.update(labels or ())
    return used


def _stats(session: Session, project_pk: int) -> ProjectStats:
    by_status: dict[str, int] = dict(
        session.execute(
            select(t.items.c.status, func.count()).where(t.items.c.project_pk == project_pk).group_by(t.items.c.status)
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


def _project(session: Session, row: Row[Any], *, with_stats: bool = True) -> Project:
    return Project(
        organization_id=row.organization_id,
        project_id=row.project_id,
        display_name=row.display_name,
        description=row.description,
        task_type=TaskType(row.task_type),
        label_schema=schema_of(session, row),
        settings=settings_from_json(row.settings),
        create_time=row.create_time,
        update_time=row.update_time,
        stats=_stats(session, row.pk) if with_stats else ProjectStats(),
    )
