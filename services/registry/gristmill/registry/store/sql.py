"""SQLAlchemy implementation of the registry store (SQLite file by default, PostgreSQL by URL).

Structured values that are only ever read whole (signature, lineage, file lists, decisions) are JSON
columns; what the API filters on (tags, final metrics, aliases) has tables of its own so that searches
and their paging run in SQL on both back-ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from gristmill.core.errors import AbortedError, AlreadyExistsError, NotFoundError
from gristmill.core.sql import Database
from gristmill.registry.domain.model import (
    AliasCause,
    AliasChange,
    BaseModel,
    BaseModelSource,
    CardText,
    Comparison,
    FileRef,
    Lineage,
    Metric,
    MetricGoal,
    ModelCard,
    ModelQuery,
    ModelVersion,
    Page,
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
    RegisteredModel,
    Signature,
    TensorSpec,
    VersionDraft,
    VersionQuery,
    VersionStatus,
)
from gristmill.registry.store.base import RegistryStore, RegistryTransaction

_NAME = 128
_KEY = 1024


class RegistryBase(DeclarativeBase):
    metadata = MetaData()


class LockRow(RegistryBase):
    """Named installation-wide locks: ``lock_model_count`` bumps ``registered_models`` so that counting the models
    and inserting one is a single step for every registry process (the licence's max_registered_models)."""

    __tablename__ = "registry_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger, default=0)


_MODEL_COUNT_LOCK = "registered_models"


class ModelRow(RegistryBase):
    __tablename__ = "registry_models"
    __table_args__ = (UniqueConstraint("organization_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME))
    name: Mapped[str] = mapped_column(String(_NAME))
    description: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(64))
    label_map: Mapped[list[str]] = mapped_column(JSON)
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    alias_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped by lock_model: an UPDATE is the one statement that takes a row lock on PostgreSQL and the
    # write lock on SQLite, so every writer of a model queues behind it.
    lock_counter: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(255))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelTagRow(RegistryBase):
    __tablename__ = "registry_model_tags"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VersionRow(RegistryBase):
    __tablename__ = "registry_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        # NULL for manual registrations (NULLs never collide): one version per training job.
        UniqueConstraint("organization_id", "training_job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    artifact_prefix: Mapped[str] = mapped_column(String(_KEY))
    source_prefix: Mapped[str] = mapped_column(String(_KEY))
    source_manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    task: Mapped[str] = mapped_column(String(64))
    label_map: Mapped[list[str]] = mapped_column(JSON)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_job_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(255))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VersionTagRow(RegistryBase):
    __tablename__ = "registry_version_tags"

    version_id: Mapped[int] = mapped_column(ForeignKey("registry_versions.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VersionMetricRow(RegistryBase):
    """The final value of each (metric, split) of a version, for metric filters."""

    __tablename__ = "registry_version_metrics"

    version_id: Mapped[int] = mapped_column(ForeignKey("registry_versions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    split: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class AliasRow(RegistryBase):
    __tablename__ = "registry_aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasHistoryRow(RegistryBase):
    __tablename__ = "registry_alias_history"
    __table_args__ = (UniqueConstraint("model_id", "sequence"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), index=True)
    sequence: Mapped[int] = mapped_column(BigInteger)
    alias: Mapped[str] = mapped_column(String(_NAME))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text, default="")
    cause: Mapped[str] = mapped_column(String(16))
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    change_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PolicyRow(RegistryBase):
    __tablename__ = "registry_promotion_policies"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    target_alias: Mapped[str] = mapped_column(String(_NAME))
    metric_name: Mapped[str] = mapped_column(String(_NAME))
    split: Mapped[str] = mapped_column(String(16))
    goal: Mapped[str] = mapped_column(String(16))
    baseline_alias: Mapped[str] = mapped_column(String(_NAME))
    min_improvement: Mapped[float] = mapped_column(Float)
    min_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    mode: Mapped[str] = mapped_column(String(32))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PendingPromotionRow(RegistryBase):
    __tablename__ = "registry_pending_promotions"

    ordinal: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    promotion_id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), index=True)
    target_alias: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[int] = mapped_column(Integer)
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    decided_by: Mapped[str] = mapped_column(String(255), default="")
    decision_reason: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decide_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelCardRow(RegistryBase):
    __tablename__ = "registry_model_cards"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    intended_use: Mapped[str] = mapped_column(Text)
    limitations: Mapped[str] = mapped_column(Text)
    ethical_considerations: Mapped[str] = mapped_column(Text)
    training_summary: Mapped[str] = mapped_column(Text)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    markdown: Mapped[str] = mapped_column(Text)
    object: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    updated_by: Mapped[str] = mapped_column(String(255))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BaseModelRow(RegistryBase):
    __tablename__ = "registry_base_models"
    __table_args__ = (UniqueConstraint("organization_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME))
    name: Mapped[str] = mapped_column(String(_NAME))
    model_type: Mapped[str] = mapped_column(String(_NAME))
    architectures: Mapped[list[str]] = mapped_column(JSON)
    tasks: Mapped[list[str]] = mapped_column(JSON)
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    license: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    artifact_prefix: Mapped[str] = mapped_column(String(_KEY))
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    content_sha256: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


REGISTRY_TABLES = RegistryBase.metadata


class EventWriter(Protocol):
    """Writes the registry's events into the outbox of ``session`` (implemented in ``registry.events``)."""

    def version_registered(self, session: Session, version: ModelVersion) -> None: ...

    def alias_changed(self, session: Session, change: AliasChange) -> None: ...


# Uniqueness violations surface at flush as IntegrityError and are turned into domain errors there. No
# SAVEPOINT is used to recover: pysqlite's savepoints can commit the outer transaction, and every such
# violation ends the unit of work anyway (the caller's transaction rolls back).


class SqlRegistryStore(RegistryStore):
    def __init__(self, database: Database, events: EventWriter) -> None:
        self.database = database
        self.events = events
        database.create_all(REGISTRY_TABLES)
        self._ensure_lock_row(_MODEL_COUNT_LOCK)

    def _ensure_lock_row(self, name: str) -> None:
        try:
            with self.database.transaction() as session:
                if session.get(LockRow, name) is None:
                    session.add(LockRow(name=name, counter=0))
        except IntegrityError:
            pass  # another registry process inserted it first

    @contextmanager
    def transaction(self) -> Iterator[RegistryTransaction]:
        with self.database.transaction() as session:
            yield SqlRegistryTransaction(session, self.events)

    def bind(self, session: Session) -> RegistryTransaction:
        """A unit of work inside a transaction someone else owns (an event handler's session)."""
        return SqlRegistryTransaction(session, self.events)


# ------------------------------------------------------------------------------------------ conversions


def _utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone-aware columns; every time we store is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _file_to_json(ref: FileRef) -> dict[str, Any]:
    return {"key": ref.key, "sha256": ref.sha256, "size_bytes": ref.size_bytes}


def _file_from_json(data: dict[str, Any]) -> FileRef:
    return FileRef(str(data["key"]), str(data["sha256"]), int(data["size_bytes"]))


def _opt_file(data: dict[str, Any] | None) -> FileRef | None:
    return _file_from_json(data) if data else None


def _signature_to_json(sig: Signature | None) -> dict[str, Any] | None:
    if sig is None:
        return None
    return {
        side: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]
        for side, specs in (("inputs", sig.inputs), ("outputs", sig.outputs))
    }


def _signature_from_json(data: dict[str, Any] | None) -> Signature | None:
    if data is None:
        return None

    def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"])) for t in items)

    return Signature(specs(data.get("inputs", [])), specs(data.get("outputs", [])))


def _metrics_to_json(metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    return [{"name": m.name, "value": m.value, "split": m.split, "step": m.step} for m in metrics]


def _metrics_from_json(items: list[dict[str, Any]]) -> tuple[Metric, ...]:
    return tuple(
        Metric(str(m["name"]), float(m["value"]), str(m["split"]), None if m["step"] is None else int(m["step"]))
        for m in items
    )


def _lineage_to_json(lineage: Lineage) -> dict[str, Any]:
    base = lineage.base_model
    return {
        "training_job_id": lineage.training_job_id,
        "project_id": lineage.project_id,
        "dataset_version_id": lineage.dataset_version_id,
        "dataset_manifest": _file_to_json(lineage.dataset_manifest) if lineage.dataset_manifest else None,
        "dataset_files": [_file_to_json(f) for f in lineage.dataset_files],
        "base_model": None
        if base is None
        else {
            "base_model_name": base.base_model_name,
            "object_prefix": base.object_prefix,
            "local_path": base.local_path,
            "content_sha256": base.content_sha256,
        },
        "hyper_parameters": dict(lineage.hyper_parameters),
        "ray_run_name": lineage.ray_run_name,
        "code_version": lineage.code_version,
    }


def _lineage_from_json(data: dict[str, Any]) -> Lineage:
    base = data.get("base_model")
    return Lineage(
        training_job_id=data.get("training_job_id", ""),
        project_id=data.get("project_id", ""),
        dataset_version_id=data.get("dataset_version_id", ""),
        dataset_manifest=_opt_file(data.get("dataset_manifest")),
        dataset_files=tuple(_file_from_json(f) for f in data.get("dataset_files", [])),
        base_model=None if base is None else BaseModelSource(**base),
        hyper_parameters=dict(data.get("hyper_parameters", {})),
        ray_run_name=data.get("ray_run_name", ""),
        code_version=data.get("code_version", ""),
    )


def _decision_to_json(decision: PromotionDecision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {
        "metric_name": decision.metric_name,
        "split": decision.split,
        "candidate_version": decision.candidate_version,
        "candidate_value": decision.candidate_value,
        "baseline_version": decision.baseline_version,
        "baseline_value": decision.baseline_value,
        "min_improvement": decision.min_improvement,
        "passed": decision.passed,
        "explanation": decision.explanation,
    }


def _decision_from_json(data: dict[str, Any] | None) -> PromotionDecision | None:
    return None if data is None else PromotionDecision(**data)


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


# ------------------------------------------------------------------------------------------ the transaction


class SqlRegistryTransaction(RegistryTransaction):
    def __init__(self, session: Session, events: EventWriter) -> None:
        self.session = session
        self.events = events

    # -- helpers ------------------------------------------------------------------------------------------

    def _model_row(self, org: str, name: str) -> ModelRow | None:
        return self.session.execute(
            select(ModelRow).where(ModelRow.organization_id == org, ModelRow.name == name)
        ).scalar_one_or_none()

    def _require_model_row(self, org: str, name: str) -> ModelRow:
        row = self._model_row(org, name)
        if row is None:
            raise NotFoundError(f"registered model {name!r} does not exist")
        return row

    def _model(self, row: ModelRow) -> RegisteredModel:
        return self._models([row])[0]

    def _models(self, rows: Sequence[ModelRow]) -> list[RegisteredModel]:
        ids = [r.id for r in rows]
        tags: dict[int, dict[str, str]] = {i: {} for i in ids}
        aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
        if ids:
            for t in self.session.execute(select(ModelTagRow).where(ModelTagRow.model_id.in_(ids))).scalars():
                tags[t.model_id][t.key] = t.value
            for a in self.session.execute(select(AliasRow).where(AliasRow.model_id.in_(ids))).scalars():
                aliases[a.model_id][a.name] = a.version
        return [
            RegisteredModel(
                organization_id=r.organization_id,
                name=r.name,
                description=r.description,
                task=r.task,
                label_map=tuple(r.label_map),
                tags=tags[r.id],
                aliases=aliases[r.id],
                latest_version=r.latest_version,
                created_by=r.created_by,
                create_time=_utc(r.create_time),
                update_time=_utc(r.update_time),
            )
            for r in rows
        ]

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
                source_manifest=_file_from_json(r.source_manifest),
                files=tuple(_file_from_json(f) for f in r.files),
                manifest=_opt_file(r.manifest),
                signature=_signature_from_json(r.signature),
                task=r.task,
                label_map=tuple(r.label_map),
                metrics=_metrics_from_json(r.metrics),
                lineage=_lineage_from_json(r.lineage),
                aliases=tuple(by_version.get(r.version, ())),
                description=r.description,
                tags=tags[r.id],
                created_by=r.created_by,
                create_time=_utc(r.create_time),
                update_time=_utc(r.update_time),
            )
            for r in rows
        ]

    def _version_row(self, model_id: int, version: int) -> VersionRow | None:
        return self.session.execute(
            select(VersionRow).where(VersionRow.model_id == model_id, VersionRow.version == version)
        ).scalar_one_or_none()

    def _replace_tags(
        self, table: type[ModelTagRow] | type[VersionTagRow], owner_id: int, tags: dict[str, str]
    ) -> None:
        if table is ModelTagRow:
            self.session.execute(delete(ModelTagRow).where(ModelTagRow.model_id == owner_id))
            self.session.add_all(ModelTagRow(model_id=owner_id, key=k, value=v) for k, v in tags.items())
        else:
            self.session.execute(delete(VersionTagRow).where(VersionTagRow.version_id == owner_id))
            self.session.add_all(VersionTagRow(version_id=owner_id, key=k, value=v) for k, v in tags.items())

    # -- registered models ----------------------------------------------------------------------------------

    def insert_model(
        self,
        org: str,
        name: str,
        *,
        description: str,
        task: str,
        label_map: tuple[str, ...],
        tags: dict[str, str],
        created_by: str,
        now: datetime,
    ) -> RegisteredModel:
        row = ModelRow(
            organization_id=org,
            name=name,
            description=description,
            task=task,
            label_map=list(label_map),
            latest_version=0,
            alias_sequence=0,
            lock_counter=0,
            created_by=created_by,
            create_time=now,
            update_time=now,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AlreadyExistsError(
                f"registered model {name!r} already exists; choose another name or register a version of it"
            ) from None
        self._replace_tags(ModelTagRow, row.id, tags)
        self.session.flush()
        return self._model(row)

    def get_model(self, org: str, name: str) -> RegisteredModel | None:
        row = self._model_row(org, name)
        return None if row is None else self._model(row)

    def count_models(self) -> int:
        return int(self.session.execute(select(func.count()).select_from(ModelRow)).scalar_one())

    def lock_model_count(self) -> None:
        # An UPDATE takes the row lock on PostgreSQL and the write lock on SQLite, as lock_model does.
        self.session.execute(
            update(LockRow)
            .where(LockRow.name == _MODEL_COUNT_LOCK)
            .values(counter=LockRow.counter + 1)
            .execution_options(synchronize_session=False)
        )

    def lock_model(self, org: str, name: str) -> bool:
        result = self.session.execute(
            update(ModelRow)
            .where(ModelRow.organization_id == org, ModelRow.name == name)
            .values(lock_counter=ModelRow.lock_counter + 1)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    def update_model(
        self,
        org: str,
        name: str,
        *,
        now: datetime,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        label_map: tuple[str, ...] | None = None,
    ) -> RegisteredModel:
        row = self._require_model_row(org, name)
        if description is not None:
            row.description = description
        if label_map is not None:
            row.label_map = list(label_map)
        if tags is not None:
            self._replace_tags(ModelTagRow, row.id, tags)
        row.update_time = now
        self.session.flush()
        return self._model(row)

    def search_models(self, org: str, query: ModelQuery, page: Page) -> tuple[list[RegisteredModel], str | None]:
        stmt = select(ModelRow).where(ModelRow.organization_id == org)
        if query.name_prefix:
            stmt = stmt.where(ModelRow.name.startswith(query.name_prefix, autoescape=True))
        if query.task:
            stmt = stmt.where(ModelRow.task == query.task)
        for key, value in sorted(query.tags.items()):
            stmt = stmt.where(
                exists().where(ModelTagRow.model_id == ModelRow.id, ModelTagRow.key == key, ModelTagRow.value == value)
            )
        if query.has_alias:
            stmt = stmt.where(exists().where(AliasRow.model_id == ModelRow.id, AliasRow.name == query.has_alias))
        if page.after is not None:
            stmt = stmt.where(ModelRow.name > page.after)
        rows = list(self.session.execute(stmt.order_by(ModelRow.name).limit(page.size + 1)).scalars())
        more = len(rows) > page.size
        rows = rows[: page.size]
        return self._models(rows), (rows[-1].name if more and rows else None)

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
            source_manifest=_file_to_json(draft.source_manifest),
            files=[],
            manifest=None,
            signature=_signature_to_json(draft.signature),
            task=draft.task,
            label_map=list(draft.label_map),
            metrics=_metrics_to_json(draft.metrics),
            lineage=_lineage_to_json(draft.lineage),
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
        self._replace_tags(VersionTagRow, row.id, draft.tags)
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
                files=[_file_to_json(f) for f in files],
                manifest=_file_to_json(manifest) if manifest else None,
                signature=_signature_to_json(signature),
                task=task,
                label_map=list(label_map),
                metrics=_metrics_to_json(metrics),
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
            self._replace_tags(VersionTagRow, row.id, tags)
        row.update_time = now
        self.session.flush()
        return self._versions(model, [row])[0]

    # -- aliases --------------------------------------------------------------------------------------------

    def get_alias(self, org: str, model_name: str, alias: str) -> int | None:
        found = self.session.execute(
            select(AliasRow.version)
            .join(ModelRow, ModelRow.id == AliasRow.model_id)
            .where(ModelRow.organization_id == org, ModelRow.name == model_name, AliasRow.name == alias)
        ).scalar_one_or_none()
        return None if found is None else int(found)

    def write_alias(
        self,
        org: str,
        model_name: str,
        alias: str,
        *,
        to_version: int | None,
        actor: str,
        reason: str,
        cause: AliasCause,
        decision: PromotionDecision | None,
        now: datetime,
    ) -> AliasChange:
        model = self._require_model_row(org, model_name)
        current = self.session.execute(
            select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.name == alias)
        ).scalar_one_or_none()
        from_version = None if current is None else current.version
        if to_version is None:
            if current is not None:
                self.session.delete(current)
        elif current is None:
            self.session.add(AliasRow(model_id=model.id, name=alias, version=to_version, update_time=now))
        else:
            current.version = to_version
            current.update_time = now
        self.session.execute(
            update(ModelRow)
            .where(ModelRow.id == model.id)
            .values(alias_sequence=ModelRow.alias_sequence + 1)
            .execution_options(synchronize_session=False)
        )
        sequence = int(
            self.session.execute(select(ModelRow.alias_sequence).where(ModelRow.id == model.id)).scalar_one()
        )
        history = AliasHistoryRow(
            model_id=model.id,
            sequence=sequence,
            alias=alias,
            from_version=from_version,
            to_version=to_version,
            actor=actor,
            reason=reason,
            cause=cause.value,
            decision=_decision_to_json(decision),
            change_time=now,
        )
        self.session.add(history)
        try:
            self.session.flush()
        except IntegrityError:
            # Only reachable when a caller skipped lock_model and raced another writer.
            raise AbortedError(f"alias {alias!r} of {model_name!r} changed concurrently; retry") from None
        return self._change(model, history)

    @staticmethod
    def _change(model: ModelRow, row: AliasHistoryRow) -> AliasChange:
        return AliasChange(
            organization_id=model.organization_id,
            model_name=model.name,
            alias=row.alias,
            sequence=row.sequence,
            from_version=row.from_version,
            to_version=row.to_version,
            actor=row.actor,
            reason=row.reason,
            cause=AliasCause(row.cause),
            decision=_decision_from_json(row.decision),
            change_time=_utc(row.change_time),
        )

    def latest_alias_change(self, org: str, model_name: str, alias: str) -> AliasChange | None:
        model = self._require_model_row(org, model_name)
        row = self.session.execute(
            select(AliasHistoryRow)
            .where(AliasHistoryRow.model_id == model.id, AliasHistoryRow.alias == alias)
            .order_by(AliasHistoryRow.sequence.desc())
            .limit(1)
        ).scalar_one_or_none()
        return None if row is None else self._change(model, row)

    def alias_history(self, org: str, model_name: str, alias: str, page: Page) -> tuple[list[AliasChange], str | None]:
        model = self._require_model_row(org, model_name)
        stmt = select(AliasHistoryRow).where(AliasHistoryRow.model_id == model.id)
        if alias:
            stmt = stmt.where(AliasHistoryRow.alias == alias)
        if page.after is not None:
            stmt = stmt.where(AliasHistoryRow.sequence < int(page.after))
        rows = list(self.session.execute(stmt.order_by(AliasHistoryRow.sequence.desc()).limit(page.size + 1)).scalars())
        more = len(rows) > page.size
        rows = rows[: page.size]
        return [self._change(model, r) for r in rows], (str(rows[-1].sequence) if more and rows else None)

    # -- promotion policies ----------------------------------------------------------------------------------

    def put_policy(self, org: str, policy: PromotionPolicy) -> PromotionPolicy:
        model = self._require_model_row(org, policy.model_name)
        row = self.session.get(PolicyRow, model.id)
        if row is None:
            row = PolicyRow(model_id=model.id)
            self.session.add(row)
        row.enabled = policy.enabled
        row.target_alias = policy.target_alias
        row.metric_name = policy.metric_name
        row.split = policy.split
        row.goal = policy.goal.value
        row.baseline_alias = policy.baseline_alias
        row.min_improvement = policy.min_improvement
        row.min_value = policy.min_value
        row.mode = policy.mode.value
        assert policy.update_time is not None
        row.update_time = policy.update_time
        self.session.flush()
        return self._policy(model, row)

    @staticmethod
    def _policy(model: ModelRow, row: PolicyRow) -> PromotionPolicy:
        return PromotionPolicy(
            model_name=model.name,
            enabled=row.enabled,
            target_alias=row.target_alias,
            metric_name=row.metric_name,
            split=row.split,
            goal=MetricGoal(row.goal),
            baseline_alias=row.baseline_alias,
            min_improvement=row.min_improvement,
            min_value=row.min_value,
            mode=PromotionMode(row.mode),
            update_time=_utc(row.update_time),
        )

    def get_policy(self, org: str, model_name: str) -> PromotionPolicy | None:
        model = self._model_row(org, model_name)
        if model is None:
            return None
        row = self.session.get(PolicyRow, model.id)
        return None if row is None else self._policy(model, row)

    def delete_policy(self, org: str, model_name: str) -> bool:
        model = self._require_model_row(org, model_name)
        result = self.session.execute(delete(PolicyRow).where(PolicyRow.model_id == model.id))
        return bool(getattr(result, "rowcount", 0))

    # -- pending promotions ---------------------------------------------------------------------------------

    def _promotion(self, row: PendingPromotionRow, model_name: str) -> PendingPromotion:
        decision = _decision_from_json(row.decision)
        assert decision is not None
        return PendingPromotion(
            promotion_id=row.promotion_id,
            organization_id=row.organization_id,
            model_name=model_name,
            target_alias=row.target_alias,
            version=row.version,
            from_version=row.from_version,
            decision=decision,
            state=PromotionState(row.state),
            decided_by=row.decided_by,
            decision_reason=row.decision_reason,
            create_time=_utc(row.create_time),
            decide_time=None if row.decide_time is None else _utc(row.decide_time),
        )

    def add_pending_promotion(self, promotion: PendingPromotion) -> PendingPromotion:
        model = self._require_model_row(promotion.organization_id, promotion.model_name)
        row = PendingPromotionRow(
            promotion_id=promotion.promotion_id,
            organization_id=promotion.organization_id,
            model_id=model.id,
            target_alias=promotion.target_alias,
            version=promotion.version,
            from_version=promotion.from_version,
            decision=_decision_to_json(promotion.decision),
            state=promotion.state.value,
            decided_by=promotion.decided_by,
            decision_reason=promotion.decision_reason,
            create_time=promotion.create_time,
            decide_time=promotion.decide_time,
        )
        self.session.add(row)
        self.session.flush()
        return self._promotion(row, model.name)

    def get_pending_promotion(self, org: str, promotion_id: str) -> PendingPromotion | None:
        found = self.session.execute(
            select(PendingPromotionRow, ModelRow.name)
            .join(ModelRow, ModelRow.id == PendingPromotionRow.model_id)
            .where(PendingPromotionRow.organization_id == org, PendingPromotionRow.promotion_id == promotion_id)
        ).first()
        return None if found is None else self._promotion(found[0], found[1])

    def list_pending_promotions(
        self, org: str, model_name: str, include_decided: bool, page: Page
    ) -> tuple[list[PendingPromotion], str | None]:
        stmt = (
            select(PendingPromotionRow, ModelRow.name)
            .join(ModelRow, ModelRow.id == PendingPromotionRow.model_id)
            .where(PendingPromotionRow.organization_id == org)
        )
        if model_name:
            stmt = stmt.where(ModelRow.name == model_name)
        if not include_decided:
            stmt = stmt.where(PendingPromotionRow.state == PromotionState.PENDING.value)
        if page.after is not None:
            stmt = stmt.where(PendingPromotionRow.ordinal > int(page.after))
        rows = self.session.execute(stmt.order_by(PendingPromotionRow.ordinal).limit(page.size + 1)).all()
        more = len(rows) > page.size
        rows = rows[: page.size]
        items = [self._promotion(row, name) for row, name in rows]
        return items, (str(rows[-1][0].ordinal) if more and rows else None)

    def decide_pending_promotion(
        self, org: str, promotion_id: str, *, state: PromotionState, decided_by: str, reason: str, now: datetime
    ) -> PendingPromotion:
        found = self.session.execute(
            select(PendingPromotionRow, ModelRow.name)
            .join(ModelRow, ModelRow.id == PendingPromotionRow.model_id)
            .where(PendingPromotionRow.organization_id == org, PendingPromotionRow.promotion_id == promotion_id)
        ).first()
        if found is None:
            raise NotFoundError(f"promotion {promotion_id!r} does not exist")
        row, name = found
        row.state = state.value
        row.decided_by = decided_by
        row.decision_reason = reason
        row.decide_time = now
        self.session.flush()
        return self._promotion(row, name)

    def supersede_pending_promotions(
        self, org: str, model_name: str, *, alias: str | None, reason: str, now: datetime
    ) -> int:
        model = self._require_model_row(org, model_name)
        stmt = update(PendingPromotionRow).where(
            PendingPromotionRow.model_id == model.id, PendingPromotionRow.state == PromotionState.PENDING.value
        )
        if alias is not None:
            stmt = stmt.where(PendingPromotionRow.target_alias == alias)
        result = self.session.execute(
            stmt.values(
                state=PromotionState.SUPERSEDED.value, decided_by="registry", decision_reason=reason, decide_time=now
            ).execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0))

    # -- model cards ----------------------------------------------------------------------------------------

    def latest_card(self, org: str, model_name: str, version: int) -> ModelCard | None:
        model = self._model_row(org, model_name)
        if model is None:
            return None
        row = self.session.execute(
            select(ModelCardRow)
            .where(ModelCardRow.model_id == model.id, ModelCardRow.version == version)
            .order_by(ModelCardRow.revision.desc())
            .limit(1)
        ).scalar_one_or_none()
        if row is None:
            return None
        return ModelCard(
            model_name=model.name,
            version=row.version,
            revision=row.revision,
            text=CardText(row.intended_use, row.limitations, row.ethical_considerations),
            training_summary=row.training_summary,
            metrics=_metrics_from_json(row.metrics),
            markdown=row.markdown,
            object=_opt_file(row.object),
            updated_by=row.updated_by,
            update_time=_utc(row.update_time),
        )

    def add_card(self, org: str, card: ModelCard) -> ModelCard:
        model = self._require_model_row(org, card.model_name)
        row = ModelCardRow(
            model_id=model.id,
            version=card.version,
            revision=card.revision,
            intended_use=card.text.intended_use,
            limitations=card.text.limitations,
            ethical_considerations=card.text.ethical_considerations,
            training_summary=card.training_summary,
            metrics=_metrics_to_json(card.metrics),
            markdown=card.markdown,
            object=_file_to_json(card.object) if card.object else None,
            updated_by=card.updated_by,
            update_time=card.update_time,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AbortedError(
                f"the model card of {card.model_name!r} version {card.version} was edited concurrently; retry"
            ) from None
        return card

    # -- base models ----------------------------------------------------------------------------------------

    @staticmethod
    def _base_model(row: BaseModelRow) -> BaseModel:
        return BaseModel(
            organization_id=row.organization_id,
            name=row.name,
            model_type=row.model_type,
            architectures=tuple(row.architectures),
            tasks=tuple(row.tasks),
            parameter_count=row.parameter_count,
            license=row.license,
            description=row.description,
            artifact_prefix=row.artifact_prefix,
            files=tuple(_file_from_json(f) for f in row.files),
            content_sha256=row.content_sha256,
            create_time=_utc(row.create_time),
        )

    def insert_base_model(self, base_model: BaseModel) -> BaseModel:
        row = BaseModelRow(
            organization_id=base_model.organization_id,
            name=base_model.name,
            model_type=base_model.model_type,
            architectures=list(base_model.architectures),
            tasks=list(base_model.tasks),
            parameter_count=base_model.parameter_count,
            license=base_model.license,
            description=base_model.description,
            artifact_prefix=base_model.artifact_prefix,
            files=[_file_to_json(f) for f in base_model.files],
            content_sha256=base_model.content_sha256,
            create_time=base_model.create_time,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AlreadyExistsError(f"base model {base_model.name!r} already exists; choose another name") from None
        return self._base_model(row)

    def get_base_model(self, org: str, name: str) -> BaseModel | None:
        row = self.session.execute(
            select(BaseModelRow).where(BaseModelRow.organization_id == org, BaseModelRow.name == name)
        ).scalar_one_or_none()
        return None if row is None else self._base_model(row)

    def list_base_models(self, org: str, task: str, page: Page) -> tuple[list[BaseModel], str | None]:
        stmt = select(BaseModelRow).where(BaseModelRow.organization_id == org)
        if page.after is not None:
            stmt = stmt.where(BaseModelRow.name > page.after)
        items: list[BaseModel] = []
        more = False
        # The task filter looks inside a JSON list, which the two back-ends query differently; base models
        # are few, so filter while streaming in name order.
        for row in self.session.execute(stmt.order_by(BaseModelRow.name)).scalars():
            if task and task not in row.tasks:
                continue
            if len(items) == page.size:
                more = True
                break
            items.append(self._base_model(row))
        return items, (items[-1].name if more and items else None)

    # -- events ---------------------------------------------------------------------------------------------

    def emit_version_registered(self, version: ModelVersion) -> None:
        self.events.version_registered(self.session, version)

    def emit_alias_changed(self, change: AliasChange) -> None:
        self.events.alias_changed(self.session, change)
