"""SQL part of the registry store: versions, their tags and final metrics (what version filters query)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from gristmill.core.errors import AlreadyExistsError, NotFoundError
from gristmill.core.paging import Page
from gristmill.core.serialization import from_plain, to_plain
from gristmill.core.sql import utc
from gristmill.core.values import FileRef, Signature
from gristmill.registry.domain.model import (
    Comparison,
    Lineage,
    Metric,
    ModelVersion,
    VersionDraft,
    VersionQuery,
    VersionStatus,
)
from gristmill.registry.domain.ports import VersionRepository
from gristmill.registry.store.sql_common import (
    SqlUnit,
    metrics_from_plain,
    metrics_to_plain,
    optional,
    plain_or_none,
)
from gristmill.registry.store.tables import AliasRow, ModelRow, VersionMetricRow, VersionRow, VersionTagRow


def _final_metrics(metrics: Sequence[Metric]) -> dict[tuple[str, str], float]:
    """The last value of each (name, split): what metric filters and policies compare."""
    final: dict[tuple[str, str], float] = {}
    for m in metrics:
        final[(m.name, m.split)] = m.value
    return final


def _compare(column: Any, comparison: Comparison, value: float) -> ColumnElement[bool]:
    if comparison is Comparison.GREATER_OR_EQUAL:
        return column >= value  # type: ignore[no-any-return]
    if comparison is Comparison.GREATER:
        return column > value  # type: ignore[no-any-return]
    if comparison is Comparison.LESS_OR_EQUAL:
        return column <= value  # type: ignore[no-any-return]
    return column < value  # type: ignore[no-any-return]


class SqlVersions(SqlUnit, VersionRepository):
    def _versions(self, model: ModelRow, rows: Sequence[VersionRow]) -> list[ModelVersion]:
        ids = [r.id for r in rows]
        tags: dict[int, dict[str, str]] = {i: {} for i in ids}
        if ids:
            for t in self.session.execute(select(VersionTagRow).where(VersionTagRow.version_id.in_(ids))).scalars():
                tags[t.version_id][t.key] = t.value
        by_version: dict[int, list[str]] = {}
        for a in self.session.execute(
            select(AliasRow).where(AliasRow.model_id == model.id).order_by(AliasRow.name)
        ).scalars():
            by_version.setdefault(a.version, []).append(a.name)
        return [
            ModelVersion(
                organization_id=r.organization_id,
                model_name=model.name,
                version=r.version,
                status=VersionStatus(r.status),
                status_reason=r.status_reason,
                artifact_prefix=r.artifact_prefix,
                source_prefix=r.source_prefix,
                source_manifest=from_plain(FileRef, r.source_manifest),
                files=tuple(from_plain(FileRef, f) for f in r.files),
                manifest=optional(FileRef, r.manifest),
                signature=optional(Signature, r.signature),
                task=r.task,
                label_map=tuple(r.label_map),
                metrics=metrics_from_plain(r.metrics),
                lineage=from_plain(Lineage, r.lineage),
                aliases=tuple(by_version.get(r.version, ())),
                description=r.description,
                tags=tags[r.id],
                created_by=r.created_by,
                create_time=utc(r.create_time),
                update_time=utc(r.update_time),
                rolled_back_reason=r.rolled_back_reason or "",
            )
            for r in rows
        ]

    def _version_row(self, model_id: int, version: int) -> VersionRow | None:
        return self.session.execute(
            select(VersionRow).where(VersionRow.model_id == model_id, VersionRow.version == version)
        ).scalar_one_or_none()

    def _replace_version_tags(self, version_id: int, tags: dict[str, str]) -> None:
        self.session.execute(delete(VersionTagRow).where(VersionTagRow.version_id == version_id))
        self.session.add_all(VersionTagRow(version_id=version_id, key=k, value=v) for k, v in tags.items())

    # -- versions -------------------------------------------------------------------------------------------

    def add_version(
        self,
        org: str,
        model_name: str,
        draft: VersionDraft,
        *,
        artifact_prefix_for: Callable[[str, str, int], str],
        created_by: str,
        now: datetime,
    ) -> ModelVersion:
        # The UPDATE both allocates the number and locks the model, so concurrent registrations queue.
        result = self.session.execute(
            update(ModelRow)
            .where(ModelRow.organization_id == org, ModelRow.name == model_name)
            .values(latest_version=ModelRow.latest_version + 1, update_time=now)
            .execution_options(synchronize_session=False)
        )
        if not getattr(result, "rowcount", 0):
            raise NotFoundError(f"registered model {model_name!r} does not exist")
        model = self._require_model_row(org, model_name)
        self.session.refresh(model)
        number = model.latest_version
        final = _final_metrics(draft.metrics)
        row = VersionRow(
            model_id=model.id,
            organization_id=org,
            version=number,
            status=VersionStatus.PENDING.value,
            status_reason="",
            artifact_prefix=artifact_prefix_for(org, model_name, number),
            source_prefix=draft.source_prefix,
            source_manifest=to_plain(draft.source_manifest),
            files=[],
            manifest=None,
            signature=plain_or_none(draft.signature),
            task=draft.task,
            label_map=list(draft.label_map),
            metrics=metrics_to_plain(draft.metrics),
            lineage=to_plain(draft.lineage),
            training_job_id=draft.lineage.training_job_id or None,
            description=draft.description,
            created_by=created_by,
            create_time=now,
            update_time=now,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AlreadyExistsError(
                f"training job {draft.lineage.training_job_id!r} is already registered as a version"
            ) from None
        self._replace_version_tags(row.id, draft.tags)
        self.session.add_all(
            VersionMetricRow(version_id=row.id, name=name, split=split, value=value)
            for (name, split), value in final.items()
        )
        self.session.flush()
        return self._versions(model, [row])[0]

    def find_version_by_job(self, org: str, training_job_id: str) -> ModelVersion | None:
        found = self.session.execute(
            select(VersionRow, ModelRow)
            .join(ModelRow, ModelRow.id == VersionRow.model_id)
            .where(VersionRow.organization_id == org, VersionRow.training_job_id == training_job_id)
        ).first()
        if found is None:
            return None
        return self._versions(found[1], [found[0]])[0]

    def get_version(self, org: str, model_name: str, version: int) -> ModelVersion | None:
        model = self._model_row(org, model_name)
        if model is None:
            return None
        row = self._version_row(model.id, version)
        return None if row is None else self._versions(model, [row])[0]

    def latest_ready_version(self, org: str, model_name: str) -> ModelVersion | None:
        model = self._model_row(org, model_name)
        if model is None:
            return None
        row = self.session.execute(
            select(VersionRow)
            .where(VersionRow.model_id == model.id, VersionRow.status == VersionStatus.READY.value)
            .order_by(VersionRow.version.desc())
            .limit(1)
        ).scalar_one_or_none()
        return None if row is None else self._versions(model, [row])[0]

    def list_versions(
        self, org: str, model_name: str, query: VersionQuery, page: Page
    ) -> tuple[list[ModelVersion], str | None]:
        model = self._require_model_row(org, model_name)
        stmt = select(VersionRow).where(VersionRow.model_id == model.id)
        if query.statuses:
            stmt = stmt.where(VersionRow.status.in_([s.value for s in query.statuses]))
        for key, value in sorted(query.tags.items()):
            stmt = stmt.where(
                exists().where(
                    VersionTagRow.version_id == VersionRow.id, VersionTagRow.key == key, VersionTagRow.value == value
                )
            )
        if query.alias:
            stmt = stmt.where(
                exists().where(
                    AliasRow.model_id == model.id, AliasRow.name == query.alias, AliasRow.version == VersionRow.version
                )
            )
        for f in query.metric_filters:
            stmt = stmt.where(
                exists().where(
                    and_(
                        VersionMetricRow.version_id == VersionRow.id,
                        VersionMetricRow.name == f.metric_name,
                        VersionMetricRow.split == f.split,
                        _compare(VersionMetricRow.value, f.comparison, f.value),
                    )
                )
            )
        if page.after is not None:
            stmt = stmt.where(VersionRow.version < int(page.after))
        rows = list(self.session.execute(stmt.order_by(VersionRow.version.desc()).limit(page.size + 1)).scalars())
        more = len(rows) > page.size
        rows = rows[: page.size]
        return self._versions(model, rows), (str(rows[-1].version) if more and rows else None)

    def pending_versions(self) -> list[ModelVersion]:
        found = self.session.execute(
            select(VersionRow, ModelRow)
            .join(ModelRow, ModelRow.id == VersionRow.model_id)
            .where(VersionRow.status == VersionStatus.PENDING.value)
            .order_by(VersionRow.id)
        ).all()
        return [self._versions(model, [row])[0] for row, model in found]

    def complete_version(
        self,
        org: str,
        model_name: str,
        version: int,
        *,
        status: VersionStatus,
        reason: str,
        files: tuple[FileRef, ...],
        manifest: FileRef | None,
        signature: Signature | None,
        task: str,
        label_map: tuple[str, ...],
        metrics: tuple[Metric, ...],
        now: datetime,
    ) -> ModelVersion | None:
        model = self._require_model_row(org, model_name)
        row = self._version_row(model.id, version)
        if row is None:
            raise NotFoundError(f"version {version} of {model_name!r} does not exist")
        # Conditional on PENDING, so two verifiers of one version (a resume racing a redelivery) finish it once.
        result = self.session.execute(
            update(VersionRow)
            .where(VersionRow.id == row.id, VersionRow.status == VersionStatus.PENDING.value)
            .values(
                status=status.value,
                status_reason=reason,
                files=[to_plain(f) for f in files],
                manifest=to_plain(manifest) if manifest else None,
                signature=plain_or_none(signature),
                task=task,
                label_map=list(label_map),
                metrics=metrics_to_plain(metrics),
                update_time=now,
            )
            .execution_options(synchronize_session=False)
        )
        if not getattr(result, "rowcount", 0):
            return None
        self.session.execute(delete(VersionMetricRow).where(VersionMetricRow.version_id == row.id))
        self.session.add_all(
            VersionMetricRow(version_id=row.id, name=name, split=split, value=value)
            for (name, split), value in _final_metrics(metrics).items()
        )
        self.session.flush()
        self.session.refresh(row)
        return self._versions(model, [row])[0]

    def update_version(
        self,
        org: str,
        model_name: str,
        version: int,
        *,
        now: datetime,
        description: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> ModelVersion:
        model = self._require_model_row(org, model_name)
        row = self._version_row(model.id, version)
        if row is None:
            raise NotFoundError(f"version {version} of {model_name!r} does not exist")
        if description is not None:
            row.description = description
        if tags is not None:
            self._replace_version_tags(row.id, tags)
        row.update_time = now
        self.session.flush()
        return self._versions(model, [row])[0]
