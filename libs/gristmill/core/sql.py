"""SQLAlchemy 2 helpers shared by every service's store.

SQLite (a file per service) is the default; PostgreSQL is chosen by URL. Stores receive a
``Database`` and use ``Database.transaction()`` so that the state change and its outbox row commit
together (see ``gristmill.core.events.outbox``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from gristmill.core.errors import ConfigurationError


class Base(DeclarativeBase):
    """Declarative base for tables owned by the shared library (the outbox, handled events)."""

    metadata = MetaData()


class Database:
    """An engine plus a session factory. Safe to share between threads."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigurationError(
                f"database URL {url!r} is not valid: use sqlite:///path.db or postgresql://..."
            ) from None
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # Threads share the engine; SQLite needs this flag for that, and a busy timeout so
            # two writers wait instead of failing with "database is locked".
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.url = url
        self.engine: Engine = create_engine(parsed, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def create_all(self, *metadatas: MetaData) -> None:
        """Refuse a database whose existing tables lack columns this release reads (``check_schema``, before
        anything is written), then create the shared tables and the given service tables that do not exist.

        A service's own database is brought to its schema by its migrations instead
        (``gristmill.core.migrations.upgrade_to_head``, from ``open_platform``); this is for tests, tools and
        services without migrations."""
        self.check_schema(Base.metadata, *metadatas)
        for md in (Base.metadata, *metadatas):
            md.create_all(self.engine)

    def check_schema(self, *metadatas: MetaData) -> None:
        """``ConfigurationError`` naming every table that lacks a column of ``metadatas``.

        ``create_all`` creates missing tables but never changes an existing one, so a database written by an
        older release would otherwise start, then fail (or, worse, skip rows) at the first query that needs a
        new column. Refusing at start, with the tables and columns named, is the safe answer until the release
        ships a migration for that change.
        """
        inspector = sa_inspect(self.engine)
        existing = set(inspector.get_table_names())
        lacking = []
        for md in metadatas:
            for table in md.sorted_tables:
                if table.name not in existing:
                    continue
                have = {column["name"] for column in inspector.get_columns(table.name)}
                missing = [column.name for column in table.columns if column.name not in have]
                if missing:
                    lacking.append(f"{table.name} lacks {', '.join(missing)}")
        if lacking:
            where = self.engine.url.render_as_string(hide_password=True)
            raise ConfigurationError(
                f"the database {where} was written by an older Gristmill release and this one cannot read it "
                f"({'; '.join(lacking)}): start the release that wrote it, or back it up and point the service's "
                "_DATABASE_URL (or _DATA_DIR) at a new database; nothing was changed"
            )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def on_commit(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``listener(info)`` after each transaction of this database commits, ``info`` being what its
        writers noted: the session's ``info``, or what ``committed`` was told for a write made without a session.
        Returns the undo."""

        def after_session(session: Session) -> None:
            listener(session.info)

        event.listen(self._sessions, "after_commit", after_session)
        self._listeners.append(listener)

        def undo() -> None:
            event.remove(self._sessions, "after_commit", after_session)
            self._listeners.remove(listener)

        return undo

    def committed(self, info: dict[str, Any]) -> None:
        """Tell the ``on_commit`` listeners about a transaction committed without a session (a hot path's
        statement on a DBAPI connection of the pool)."""
        for listener in list(self._listeners):
            listener(info)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers proceed while a writer commits; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def utc(value: datetime) -> datetime:
    """``value`` in UTC, as every store writes and returns times.

    SQLite keeps the wall-clock time of what it is given (dropping the zone) and hands back naive datetimes;
    PostgreSQL converts to the session's zone. Writing UTC and reading naive values as UTC makes both agree.
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
