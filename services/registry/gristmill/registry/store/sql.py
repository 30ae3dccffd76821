"""SQLAlchemy implementation of the registry store (SQLite file by default, PostgreSQL by URL).

One ``SqlRegistryTransaction`` per unit of work: the aggregates' SQL parts (``sql_models``, ``sql_versions``,
``sql_aliases``, ``sql_promotions``, ``sql_cards``) are mixins over one session, so an alias move, its history
row, its superseded promotions and its outbox event commit together. Tables are in ``tables``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.sql import Database
from gristmill.registry.domain.model import AliasChange, ModelVersion
from gristmill.registry.domain.ports import RegistryStore, RegistryTransaction
from gristmill.registry.store.sql_aliases import SqlAliases
from gristmill.registry.store.sql_cards import SqlBaseModels, SqlCards
from gristmill.registry.store.sql_common import EventWriter
from gristmill.registry.store.sql_models import SqlModels
from gristmill.registry.store.sql_promotions import SqlPromotions
from gristmill.registry.store.sql_versions import SqlVersions
from gristmill.registry.store.tables import MODEL_COUNT_LOCK, REGISTRY_TABLES, LockRow

__all__ = ["REGISTRY_TABLES", "EventWriter", "SqlRegistryStore", "SqlRegistryTransaction"]


class SqlRegistryTransaction(
    SqlModels, SqlVersions, SqlAliases, SqlPromotions, SqlCards, SqlBaseModels, RegistryTransaction
):
    # -- events (written into this transaction's outbox, published by the relay) ------------------------------

    def emit_version_registered(self, version: ModelVersion) -> None:
        self.events.version_registered(self.session, version)

    def emit_alias_changed(self, change: AliasChange) -> None:
        self.events.alias_changed(self.session, change)


class SqlRegistryStore(RegistryStore):
    def __init__(self, database: Database, events: EventWriter) -> None:
        self.database = database
        self.events = events
        self._ensure_lock_row(MODEL_COUNT_LOCK)

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
