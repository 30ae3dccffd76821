"""SQLAlchemy implementation of ``DeploymentStore`` (SQLite file by default, PostgreSQL by URL).

A spec is stored as JSON beside its key columns: it is read and written whole, and its shape is owned by
the domain dataclasses (``spec_to_json`` / ``spec_from_json``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.errors import AlreadyExistsError, NotFoundError
from gristmill.core.sql import Database, utc
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
from gristmill.serving.domain.ports import DeploymentStore
from gristmill.serving.store.tables import TABLES, AliasSequenceRow, DeploymentRow

# TABLES: what the migrations (``store/migrations``) import from here.
__all__ = ["TABLES", "SqlDeploymentStore", "spec_from_json", "spec_to_json"]


def _selector(data: dict[str, Any]) -> VersionSelector:
    return VersionSelector(version=data.get("version"), alias=data.get("alias"))


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
            "ensemble": list(spec.ensemble),
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
        # Specs stored before ensembles existed have none.
        ensemble=tuple(int(v) for v in data.get("ensemble", ())),
        create_time=utc(create),
        update_time=utc(update),
    )


class SqlDeploymentStore(DeploymentStore):
    def __init__(self, database: Database) -> None:
        self.database = database

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
                        create_time=utc(spec.create_time),
                        update_time=utc(spec.update_time),
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
            row.update_time = utc(spec.update_time)

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
        # One atomic compare-and-set (both back-ends have INSERT ... ON CONFLICT DO UPDATE ... WHERE): reading
        # the sequence and writing it back would let a concurrent, older event overwrite a newer one, and two
        # first events of an alias would collide on its key. A row is written when the sequence is new or the
        # same (another replica sharing this store applied the same event first).
        table = cast(Table, AliasSequenceRow.__table__)
        values = {
            "organization_id": organization_id,
            "registered_model_name": registered_model_name,
            "alias": alias,
            "sequence": sequence,
        }
        keys = ["organization_id", "registered_model_name", "alias"]
        if session.get_bind().dialect.name == "postgresql":
            pg = postgresql_insert(table).values(values)
            upsert: Any = pg.on_conflict_do_update(
                index_elements=keys,
                set_={"sequence": pg.excluded.sequence},
                where=table.c.sequence <= pg.excluded.sequence,
            )
        else:
            lite = sqlite_insert(table).values(values)
            upsert = lite.on_conflict_do_update(
                index_elements=keys,
                set_={"sequence": lite.excluded.sequence},
                where=table.c.sequence <= lite.excluded.sequence,
            )
        # RETURNING yields the row only when it was inserted or updated (rowcount is not reliable here).
        return session.execute(upsert.returning(table.c.sequence)).first() is not None
