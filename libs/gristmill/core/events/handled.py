"""Which events a consumer group has handled, so a redelivered ``event-id`` changes nothing.

The table lives in the shared ``Base`` metadata, in the consuming service's own database: the consumer
marks an event handled in the same transaction as the handler's state change (the handler receives that
session), so either both commit or neither does, and the memory survives a restart.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime

from sqlalchemy import DateTime, String, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from gristmill.core.sql import Base


class HandledEvent(Base):
    __tablename__ = "gristmill_handled_events"

    group_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    handled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def is_handled(session: Session, group_id: str, event_id: str) -> bool:
    return bool(handled_among(session, group_id, (event_id,)))


def handled_among(session: Session, group_id: str, event_ids: Collection[str]) -> set[str]:
    """Those of ``event_ids`` that this group has handled, in one query (a batch consumer asks for its batch)."""
    if not event_ids:
        return set()
    found = session.execute(
        select(HandledEvent.event_id).where(
            HandledEvent.group_id == group_id, HandledEvent.event_id.in_(list(event_ids))
        )
    )
    return set(found.scalars())


def mark_handled(session: Session, group_id: str, event_id: str) -> None:
    """Record the event as handled, in the caller's transaction (``mark_all_handled`` for one event)."""
    mark_all_handled(session, group_id, (event_id,))


def mark_all_handled(session: Session, group_id: str, event_ids: Collection[str]) -> None:
    """Record a batch's events as handled in one statement, now (not at the commit): ``IntegrityError`` here when
    another member of the group recorded one of them first. A batch consumer's way: one ORM object per event cost
    more than the insert itself."""
    if event_ids:
        now = datetime.now(UTC)
        session.execute(
            insert(HandledEvent), [{"group_id": group_id, "event_id": e, "handled_at": now} for e in event_ids]
        )
