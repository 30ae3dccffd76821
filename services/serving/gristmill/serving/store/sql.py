"""SQLAlchemy implementation of ``DeploymentStore`` (SQLite file by default, PostgreSQL by URL).

A spec is stored as JSON beside its key columns: it is read and written whole, and its shape is owned by
the domain dataclasses (``spec_to_json`` / ``spec_from_json``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, MetaData, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from gristmill.core.errors import AlreadyExistsError, NotFoundError
from gristmill.core.sql import Database
from gristmill.serving.domain.model import (
    BatchingConfig,
    CanaryRoute,
    DeploymentSpec,
    LengthPolicy,
    OverLengthAction,
    PredictionLoggingConfig,
    Quantization,
    VersionSelector,
)
from gristmill.serving.store.base import DeploymentStore


class ServingBase(DeclarativeBase):
    metadata = MetaData()


class DeploymentRow(ServingBase):
    __tablename__ = "serving_deployments"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    registered_model_name: Mapped[str] = mapped_column(String(128), index=True)
    spec: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasSequenceRow(ServingBase):
    __tablename__ = "serving_alias_sequences"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    registered_model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger)


TABLES = ServingBase.metadata


def _selector(data: dict[str, Any]) -> VersionSelector:
    return VersionSelector(version=data.get("version"), alias=data.get("alias"))


def _utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored here was UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def spec_to_json(spec: DeploymentSpec) -> str:
    canary = spec.canary
    return json.dumps(
        {
            "registered_model_name": spec.registered_model_name,
            "target": {"version": spec.target.version, "alias": spec.target.alias},
            "canary": None
            if canary is None
            else {"target": {"version": canary.target.version, "alias": canary.target.alias}, "weight": canary.weight},
            "batching": vars(spec.batching),
            "quantization": spec.quantization.value,
            "length_policy": {
                "max_tokens": spec.length_policy.max_tokens,
                "over_length_action": spec.length_policy.over_length_action.value,
            },
            "prediction_logging": vars(spec.prediction_logging),
        },
        sort_keys=True,
    )


def spec_from_json(organization_id: str, name: str, text: str, create: datetime, update: datetime) -> DeploymentSpec:
    data = json.loads(text)
    canary = data.get("canary")
    length = data["length_policy"]
    return DeploymentSpec(
        organization_id=organization_id,
        name=name,
        registered_model_name=data["registered_model_name"],
        target=_selector(data["target"]),
        canary=None if canary is None else CanaryRoute(_selector(canary["target"]), float(canary["weight"])),
        batching=BatchingConfig(**data["batching"]),
        quantization=Quantization(data["quantization"]),
        length_policy=LengthPolicy(length["max_tokens"], OverLengthAction(length["over_length_action"])),
        prediction_logging=PredictionLoggingConfig(**data["prediction_logging"]),
        create_time=_utc(create),
        update_time=_utc(update),
    )


class SqlDeploymentStore(DeploymentStore):
    def __init__(self, database: Database) -> None:
        self.database = database
        database.create_all(TABLES)

    @staticmethod
    def _to_spec(row: DeploymentRow) -> DeploymentSpec:
        return spec_from_json(row.organization_id, row.name, row.spec, row.create_time, row.update_time)

    def create(self, spec: DeploymentSpec) -> None:
        try:
            with self.database.transaction() as session:
                session.add(
                    DeploymentRow(
                        organization_id=spec.organization_id,
                        name=spec.name,
                        registered_model_name=spec.registered_model_name,
                        spec=spec_to_json(spec),
                        create_time=spec.create_time,
                        update_time=spec.update_time,
                    )
                )
        except IntegrityError:
            raise AlreadyExistsError(
                f"deployment {spec.name!r} already exists; choose another name or update it with UpdateDeployment"
            ) from None

    def update(self, spec: DeploymentSpec) -> None:
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, (spec.organization_id, spec.name))
            if row is None:
                raise NotFoundError(f"deployment {spec.name!r} does not exist")
            row.spec = spec_to_json(spec)
            row.update_time = spec.update_time

    def get(self, organization_id: str, name: str) -> DeploymentSpec:
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, (organization_id, name))
            if row is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            return self._to_spec(row)

    def list_page(self, organization_id: str, *, after: str = "", limit: int = 50) -> list[DeploymentSpec]:
        with self.database.transaction() as session:
            rows = session.execute(
                select(DeploymentRow)
                .where(DeploymentRow.organization_id == organization_id, DeploymentRow.name > after)
                .order_by(DeploymentRow.name)
                .limit(limit)
            ).scalars()
            return [self._to_spec(row) for row in rows]

    def list_all(self) -> list[DeploymentSpec]:
        with self.database.transaction() as session:
            rows = session.execute(
                select(DeploymentRow).order_by(DeploymentRow.organization_id, DeploymentRow.name)
            ).scalars()
            return [self._to_spec(row) for row in rows]

    def delete(self, organization_id: str, name: str) -> None:
        with self.database.transaction() as session:
            row = session.get(DeploymentRow, (organization_id, name))
            if row is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            session.delete(row)

    def apply_alias_sequence(
        self, session: Session, organization_id: str, registered_model_name: str, alias: str, sequence: int
    ) -> bool:
        row = session.get(AliasSequenceRow, (organization_id, registered_model_name, alias))
        if row is None:
            session.add(
                AliasSequenceRow(
                    organization_id=organization_id,
                    registered_model_name=registered_model_name,
                    alias=alias,
                    sequence=sequence,
                )
            )
            return True
        if sequence <= row.sequence:
            return False
        row.sequence = sequence
        return True
