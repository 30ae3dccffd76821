"""Queries and writes that several aggregate stores share, each inside the caller's session."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Row, and_, delete, insert, select, update
from sqlalchemy.orm import Session

from gristmill.core.errors import NotFoundError
from gristmill.core.sql import Database
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.model import Annotation, LabelSchema, Prediction
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.rows import annotation_from_row, consensus_values, schema_from_row

# Rows per IN (...) lookup: well under SQLite's 32,766 bound parameters.
IN_CHUNK = 900


class SqlStore:
    """What every aggregate's SQL store shares: the database (``SqlLabelingStore`` combines them)."""

    database: Database


def chunks(values: Sequence[Any]) -> Iterator[list[Any]]:
    values = list(values)
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


def project_row(session: Session, organization_id: str, project_id: str) -> Row[Any]:
    row = session.execute(
        select(t.projects).where(t.projects.c.organization_id == organization_id, t.projects.c.project_id == project_id)
    ).first()
    if row is None:
        raise NotFoundError(f"project {project_id!r} does not exist", details={"project_id": project_id})
    return row


def schema_of(session: Session, project: Row[Any], version: int | None = None) -> LabelSchema:
    """The project's schema ``version`` (None: the current one)."""
    wanted = project.schema_version if version is None else version
    row = session.execute(
        select(t.label_schemas).where(t.label_schemas.c.project_pk == project.pk, t.label_schemas.c.version == wanted)
    ).first()
    if row is None:
        raise NotFoundError(f"project {project.project_id!r} has no label schema version {wanted}")
    return schema_from_row(project.project_id, row)


def item_row(session: Session, project_pk: int, item_id: str) -> Row[Any]:
    row = session.execute(
        select(t.items).where(t.items.c.project_pk == project_pk, t.items.c.item_id == item_id)
    ).first()
    if row is None:
        raise NotFoundError(f"item {item_id!r} does not exist in this project", details={"item_id": item_id})
    return row


def annotations_of(session: Session, item_seqs: Sequence[int]) -> dict[int, list[Annotation]]:
    """The items' annotations, oldest first, by item sequence number."""
    found: dict[int, list[Annotation]] = {}
    for chunk in chunks(item_seqs):
        rows = session.execute(
            select(t.annotations, t.items.c.item_id, t.projects.c.project_id)
            .join(t.items, t.items.c.seq == t.annotations.c.item_seq)
            .join(t.projects, t.projects.c.pk == t.annotations.c.project_pk)
            .where(t.annotations.c.item_seq.in_(chunk))
            .order_by(t.annotations.c.create_time, t.annotations.c.annotation_id)
        )
        for row in rows:
            found.setdefault(row.item_seq, []).append(annotation_from_row(row))
    return found


def predictions_of(session: Session, item_seqs: Sequence[int]) -> dict[int, list[Prediction]]:
    """The items' predictions, oldest first, by item sequence number."""
    found: dict[int, list[Prediction]] = {}
    for chunk in chunks(item_seqs):
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


def put_prediction(session: Session, seq: int, prediction: Prediction) -> None:
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


def store_consensus(session: Session, item: Row[Any], rule: ConsensusRule) -> None:
    """Store the item's annotation count, and the status and consensus ``rule`` decides from its annotations.

    The item's row is locked first (SQLite serialises writers anyway). Without it, on PostgreSQL (READ
    COMMITTED) two annotators submitting for one item at once each counted only their own annotation, and the
    later commit stored a count of one: the item was then offered a third time (seen in the networked
    end-to-end test). FOR NO KEY UPDATE, not FOR UPDATE: the annotation just inserted holds a KEY SHARE lock
    on the item (its foreign key), which FOR UPDATE would wait on, and two submits would deadlock.
    """
    locked = select(t.items).where(t.items.c.seq == item.seq).with_for_update(key_share=True)
    item = session.execute(locked).one()
    labelings = [
        tuple(labels)
        for (labels,) in session.execute(select(t.annotations.c.labels).where(t.annotations.c.item_seq == item.seq))
    ]
    result = rule.decide(labelings, resolved_labels=item.resolved_labels, resolved_by=item.resolved_by)
    session.execute(
        update(t.items)
        .where(t.items.c.seq == item.seq)
        .values(annotation_count=len(labelings), **consensus_values(result.status, result.consensus))
    )
