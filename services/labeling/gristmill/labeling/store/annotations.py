"""SQL store of task leases, annotations, skips and reviewers' resolutions."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Row, Select, case, func, insert, literal, select, union, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.chat import Conversation
from gristmill.core.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError, PermissionDeniedError
from gristmill.core.ids import new_id
from gristmill.labeling.domain.agreement import RatedItem
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.model import Annotation, Item, ItemStatus, Response, SpanLabel, Task, TaskOrdering
from gristmill.labeling.domain.ordering import OfferRule
from gristmill.labeling.domain.ports import AnnotationStore
from gristmill.labeling.store import tables as t
from gristmill.labeling.store.queries import (
    SqlStore,
    annotations_of,
    item_row,
    predictions_of,
    project_row,
    schema_of,
    store_consensus,
)
from gristmill.labeling.store.rows import (
    annotation_from_row,
    annotation_values,
    is_generative,
    item_from_row,
    response_from_json,
    response_to_json,
)

# NextTask's remaining_count stops counting here (it then means "at least this many").
REMAINING_COUNT_CAP = 1000

# Rounds of waiting for a locked candidate before NextTask answers "no task" (each round waits for one submit).
_OFFER_ROUNDS = 50


def _offer_on_postgres(session: Session, query: Select[Any]) -> Row[Any] | None:
    """The first offerable item, locked, skipping rows other transactions hold.

    Every offerable row may be locked by a submit being written (it locks its item to count the annotations): the
    answer is "no task" only once those are written, else the last items look done and an annotator who stops
    at "no task" leaves them short. Waiting with a plain FOR UPDATE is not enough: after the wait PostgreSQL
    re-checks the locked row's new version but the leases in the statement's old snapshot, so the submitter's
    annotation and its closed lease both count and the item looks full. So: wait for the row, then ask again in
    a new statement (a new snapshot under READ COMMITTED).
    """
    locking = query.with_for_update(skip_locked=True, of=t.items)
    for _ in range(_OFFER_ROUNDS):
        row = session.execute(locking).first()
        if row is not None:
            return row
        candidate = session.execute(query).first()  # committed state, rows others lock included
        if candidate is None:
            return None
        session.execute(select(t.items.c.seq).where(t.items.c.seq == candidate.seq).with_for_update())
    return None


class SqlAnnotationStore(SqlStore, AnnotationStore):
    # Leasing reads candidates, then writes a lease: serialised so that two annotators never take the
    # last free slot of an item at once (PostgreSQL additionally locks the chosen row).
    _lease_lock: threading.Lock

    def next_task(
        self,
        organization_id: str,
        project_id: str,
        annotator_id: str,
        *,
        lease_seconds: int,
        now: datetime,
        offer: OfferRule,
    ) -> tuple[Task | None, int]:
        with self._lease_lock, self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
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
            remaining = _offerable_count(session, project, annotator_id, offer, now)
            if held is not None:
                return _task(session, project, held, held.task_id, held.expire_time, annotator_id), remaining + 1
            query = _offerable(project, annotator_id, offer, now).limit(1)
            if session.get_bind().dialect.name == "postgresql":
                offered = _offer_on_postgres(session, query)
            else:
                offered = session.execute(query).first()
            if offered is None:
                return None, 0
            row = session.execute(select(t.items).where(t.items.c.seq == offered.seq)).one()
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
            return _task(session, project, row, task_id, expire, annotator_id), remaining

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
        consensus: ConsensusRule,
        response: Response | None = None,
    ) -> Annotation:
        try:
            with self.database.transaction() as session:
                project = project_row(session, organization_id, project_id)
                item = item_row(session, project.pk, item_id)
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
                existing = _annotation_of(session, item.seq, annotator_id)
                if existing is not None:
                    if existing.repeats(labels, spans, comment, response):
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
                    response=response or Response(),
                )
                session.execute(insert(t.annotations).values(annotation_values(annotation, project.pk, item.seq)))
                session.execute(
                    update(t.tasks)
                    .where(t.tasks.c.item_seq == item.seq, t.tasks.c.annotator_id == annotator_id)
                    .values(closed=True)
                )
                store_consensus(session, item, consensus)
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
        consensus: ConsensusRule,
        response: Response | None = None,
    ) -> Annotation:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
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
                annotation_from_row(row),
                labels=tuple(labels),
                spans=tuple(spans),
                comment=comment,
                response=response or Response(),
                schema_version=project.schema_version,
                update_time=now,
            )
            values = annotation_values(updated, project.pk, row.item_seq)
            session.execute(
                update(t.annotations)
                .where(t.annotations.c.annotation_id == annotation_id)
                .values(
                    {k: values[k] for k in ("labels", "spans", "comment", "response", "schema_version", "update_time")}
                )
            )
            store_consensus(
                session, session.execute(select(t.items).where(t.items.c.seq == row.item_seq)).one(), consensus
            )
            return updated

    def annotation_item_id(self, organization_id: str, project_id: str, annotation_id: str) -> str:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            found = session.execute(
                select(t.items.c.item_id)
                .join(t.annotations, t.annotations.c.item_seq == t.items.c.seq)
                .where(t.annotations.c.annotation_id == annotation_id, t.annotations.c.project_pk == project.pk)
            ).scalar()
            if found is None:
                raise NotFoundError(f"annotation {annotation_id!r} does not exist in project {project_id!r}")
            return str(found)

    def skip_task(
        self, organization_id: str, project_id: str, task_id: str, annotator_id: str, reason: str, now: datetime
    ) -> None:
        with self.database.transaction() as session:
            task = _annotators_task(session, organization_id, project_id, task_id, annotator_id)
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

    def renew_task(
        self,
        organization_id: str,
        project_id: str,
        task_id: str,
        annotator_id: str,
        *,
        lease_seconds: int,
        now: datetime,
    ) -> datetime:
        # Under the lease lock: a lease that is about to expire is either renewed or offered to someone else by a
        # NextTask at the same moment, never both.
        with self._lease_lock, self.database.transaction() as session:
            task = _annotators_task(session, organization_id, project_id, task_id, annotator_id)
            if task.closed:
                raise FailedPreconditionError(f"task {task_id!r} was already submitted or skipped: nothing to renew")
            if task.expire_time <= now:
                raise FailedPreconditionError(
                    f"the lease of task {task_id!r} expired at {task.expire_time.isoformat()}: the item went "
                    "back to the queue; ask for the next task"
                )
            expire = now + timedelta(seconds=lease_seconds)
            session.execute(update(t.tasks).where(t.tasks.c.task_id == task_id).values(expire_time=expire))
            return expire

    def resolve_item(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        reviewer_id: str,
        labels: Sequence[str],
        comment: str,
        now: datetime,
        *,
        consensus: ConsensusRule,
        response: Response | None = None,
    ) -> Item:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            row = item_row(session, project.pk, item_id)
            session.execute(
                update(t.items)
                .where(t.items.c.seq == row.seq)
                .values(
                    resolved_labels=list(labels),
                    resolved_by=reviewer_id,
                    resolution_comment=comment,
                    resolved_response=response_to_json(response),
                )
            )
            store_consensus(session, item_row(session, project.pk, item_id), consensus)
            fresh = item_row(session, project.pk, item_id)
            return item_from_row(
                fresh,
                project_id,
                annotations_of(session, [fresh.seq]).get(fresh.seq, []),
                predictions_of(session, [fresh.seq]).get(fresh.seq, []),
                generative=is_generative(project),
            )

    def rated_items(
        self, organization_id: str, project_id: str, annotator_ids: Sequence[str]
    ) -> tuple[list[RatedItem], dict[str, int], dict[ItemStatus, int]]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
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

    def rated_responses(
        self, organization_id: str, project_id: str, annotator_ids: Sequence[str]
    ) -> list[tuple[str, int, dict[str, Response]]]:
        with self.database.transaction() as session:
            project = project_row(session, organization_id, project_id)
            query = (
                select(t.items.c.item_id, t.items.c.text, t.annotations.c.annotator_id, t.annotations.c.response)
                .join(t.annotations, t.annotations.c.item_seq == t.items.c.seq)
                .where(t.items.c.project_pk == project.pk, t.annotations.c.response.is_not(None))
                .order_by(t.items.c.seq)
            )
            if annotator_ids:
                query = query.where(t.annotations.c.annotator_id.in_(list(annotator_ids)))
            out: dict[str, tuple[int, dict[str, Response]]] = {}
            for item_id, text, annotator, value in session.execute(query):
                response = response_from_json(value)
                if response is None:
                    continue
                if item_id not in out:
                    out[item_id] = (len(Conversation.from_json(text).candidates), {})
                out[item_id][1][annotator] = response
            return [(item_id, count, responses) for item_id, (count, responses) in out.items()]


def _annotators_task(
    session: Session, organization_id: str, project_id: str, task_id: str, annotator_id: str
) -> Row[Any]:
    """The task row (NOT_FOUND when the project has none by that id), leased to ``annotator_id``
    (FAILED_PRECONDITION when it is another's)."""
    project = project_row(session, organization_id, project_id)
    task = session.execute(
        select(t.tasks).where(t.tasks.c.task_id == task_id, t.tasks.c.project_pk == project.pk)
    ).first()
    if task is None:
        raise NotFoundError(f"task {task_id!r} does not exist in project {project_id!r}")
    if task.annotator_id != annotator_id:
        raise FailedPreconditionError(
            f"task {task_id!r} is leased to annotator {task.annotator_id!r}, not {annotator_id!r}"
        )
    return task


def _task(
    session: Session, project: Row[Any], row: Row[Any], task_id: str, expire: datetime, annotator_id: str
) -> Task:
    # No annotations of others: seeing them would anchor the annotator.
    item = item_from_row(
        row,
        project.project_id,
        [],
        predictions_of(session, [row.seq]).get(row.seq, []),
        generative=is_generative(project),
    )
    return Task(task_id, annotator_id, item, schema_of(session, project), expire)


def _offerable(project: Row[Any], annotator_id: str, offer: OfferRule, now: datetime) -> Any:
    """The sequence numbers of the items ``offer`` allows this annotator, in its order.

    Set-based on purpose: the open leases are counted once per project (grouped, then joined) and this
    annotator's annotations, skips and leases are anti-joins, so the database reads each table once. A
    per-item subquery made every NextTask cost a probe per item (~100 ms at 20,000 items on PostgreSQL); only
    ``seq`` is selected (and sorted), the chosen item's row is read afterwards by its key.
    """
    i = t.items
    open_leases = (
        select(t.tasks.c.item_seq, func.count().label("open"))
        .where(t.tasks.c.project_pk == project.pk, t.tasks.c.closed.is_(False), t.tasks.c.expire_time > now)
        .group_by(t.tasks.c.item_seq)
        .subquery()
    )
    # What this annotator annotated, skipped or holds: NOT IN a subquery, which both databases hash once
    # (PostgreSQL's "hashed SubPlan") whatever their statistics say; an anti-join planned on stale statistics
    # (a table that just grew) became a nested loop over every item.
    mine = union(
        select(t.annotations.c.item_seq).where(
            t.annotations.c.project_pk == project.pk, t.annotations.c.annotator_id == annotator_id
        ),
        select(t.skips.c.item_seq).where(t.skips.c.annotator_id == annotator_id),
        select(t.tasks.c.item_seq).where(
            t.tasks.c.project_pk == project.pk,
            t.tasks.c.annotator_id == annotator_id,
            t.tasks.c.closed.is_(False),
            t.tasks.c.expire_time > now,
        ),
    )
    query = (
        select(i.c.seq)
        .select_from(i.outerjoin(open_leases, open_leases.c.item_seq == i.c.seq))
        .where(
            i.c.project_pk == project.pk,
            i.c.status != ItemStatus.RESOLVED.value,
            # Implied by the next condition; stated alone it is cheap and filters first.
            i.c.annotation_count < offer.annotations_per_item,
            i.c.annotation_count + func.coalesce(open_leases.c.open, 0) < offer.annotations_per_item,
            i.c.seq.not_in(mine),
        )
    )
    ordering = offer.ordering
    if ordering is TaskOrdering.RANDOM:
        # ordering.order_key, computed by the database.
        big = BigInteger()
        permuted = (i.c.shuffle_key * literal(offer.multiplier, big) + literal(offer.offset, big)) % literal(
            offer.modulus, big
        )
        query = query.order_by(permuted, i.c.seq)
    elif ordering is TaskOrdering.UNCERTAINTY_FIRST:
        query = query.order_by(case((i.c.top_probability.is_(None), 1), else_=0), i.c.top_probability, i.c.seq)
    else:
        query = query.order_by(i.c.seq)
    return query


def _offerable_count(session: Session, project: Row[Any], annotator_id: str, offer: OfferRule, now: datetime) -> int:
    """How many items this annotator could be offered, counted up to ``REMAINING_COUNT_CAP``: the database stops
    reading there (a full count cost every NextTask ~60 ms at 100,000 items on PostgreSQL)."""
    sub = _offerable(project, annotator_id, offer, now).order_by(None).limit(REMAINING_COUNT_CAP).subquery()
    return int(session.execute(select(func.count()).select_from(sub)).scalar_one())


def _annotation_of(session: Session, item_seq: int, annotator_id: str) -> Annotation | None:
    row = session.execute(
        select(t.annotations, t.items.c.item_id, t.projects.c.project_id)
        .join(t.items, t.items.c.seq == t.annotations.c.item_seq)
        .join(t.projects, t.projects.c.pk == t.annotations.c.project_pk)
        .where(t.annotations.c.item_seq == item_seq, t.annotations.c.annotator_id == annotator_id)
    ).first()
    return None if row is None else annotation_from_row(row)


def _already_annotated(annotator_id: str, item_id: str, annotation_id: str) -> AlreadyExistsError:
    which = f" (annotation {annotation_id})" if annotation_id else ""
    return AlreadyExistsError(
        f"annotator {annotator_id!r} already annotated item {item_id!r}{which}; use UpdateAnnotation to change it",
        details={"annotation_id": annotation_id} if annotation_id else None,
    )
