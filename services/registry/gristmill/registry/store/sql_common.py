"""What every part of the SQL registry store shares: the session, the event writer, model-row lookups and the
JSON form of the structured columns (``gristmill.core.serialization``: the dataclasses' own field names)."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from gristmill.core.errors import NotFoundError
from gristmill.core.serialization import from_plain, to_plain
from gristmill.registry.domain.model import AliasChange, Metric, ModelVersion
from gristmill.registry.store.tables import ModelRow

T = TypeVar("T")

_METRICS: Any = tuple[Metric, ...]


class EventWriter(Protocol):
    """Writes the registry's events into the outbox of ``session`` (implemented in ``registry.events``)."""

    def version_registered(self, session: Session, version: ModelVersion) -> None: ...

    def alias_changed(self, session: Session, change: AliasChange) -> None: ...


def plain_or_none(value: Any) -> Any:
    """The JSON column value of an optional dataclass (None stays SQL/JSON null)."""
    return None if value is None else to_plain(value)


def optional(kind: type[T], data: Any) -> T | None:
    """The dataclass a JSON column holds, or None when it holds nothing."""
    return from_plain(kind, data) if data else None


def metrics_to_plain(metrics: tuple[Metric, ...]) -> Any:
    return to_plain(tuple(metrics), _METRICS)


def metrics_from_plain(data: Any) -> tuple[Metric, ...]:
    metrics: tuple[Metric, ...] = from_plain(_METRICS, data)
    return metrics


# Uniqueness violations surface at flush as IntegrityError and are turned into domain errors there. No
# SAVEPOINT is used to recover: pysqlite's savepoints can commit the outer transaction, and every such
# violation ends the unit of work anyway (the caller's transaction rolls back).


class SqlUnit:
    """One transaction's session; each aggregate's SQL part is a mixin over it."""

    def __init__(self, session: Session, events: EventWriter) -> None:
        self.session = session
        self.events = events

    def _model_row(self, org: str, name: str) -> ModelRow | None:
        return self.session.execute(
            select(ModelRow).where(ModelRow.organization_id == org, ModelRow.name == name)
        ).scalar_one_or_none()

    def _require_model_row(self, org: str, name: str) -> ModelRow:
        row = self._model_row(org, name)
        if row is None:
            raise NotFoundError(f"registered model {name!r} does not exist")
        return row
