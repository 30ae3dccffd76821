"""Each service's schema, versioned by Alembic migrations that run at start (no alembic.ini needed).

A service's migrations live in its package, ``gristmill.<service>.store.migrations``: an ``env.py`` that calls
``run_env`` here, and ``versions/`` with one file per revision. Its schema is the shared tables
(``gristmill.core.sql.Base.metadata``: the outbox, handled events) plus its own tables; the revision a database
is at is kept in the table ``alembic_version_<service>`` of that database.

At start (``upgrade_to_head``, called by ``open_platform``):

- an empty database is upgraded to head;
- a database at a known revision is upgraded to head;
- a database at a revision this release does not know (written by a newer release) is refused, unchanged;
- a database made by ``Database.create_all`` before there were migrations (existing installs, embedded data
  dirs) is adopted: refused by ``check_schema`` when a table lacks a column this release reads, else the
  missing tables are created and the database is stamped head (a warning says so).

A developer making a schema change writes the models, then runs
``python -m gristmill.core.migrations revision <service> -m "what changed"``, reviews the generated file in
``versions/`` and commits it (tests/integration/test_migrations.py checks that head equals the models).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.autogenerate import compare_metadata, produce_migrations, render_python_code
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, MetaData, TypeDecorator, text
from sqlalchemy import inspect as sa_inspect

from gristmill.core.errors import ConfigurationError
from gristmill.core.sql import Base, Database

log = logging.getLogger(__name__)

# Attributes of the Alembic Config that ``run_env`` (in each service's env.py) reads.
_CONNECTION = "gristmill.connection"
_MIGRATIONS = "gristmill.migrations"


def migrations_package(service: str) -> str:
    """Where a service keeps its migrations, by convention."""
    return f"gristmill.{service}.store.migrations"


def shared_metadata() -> MetaData:
    """The tables every service's database holds, their modules imported so that the metadata is complete."""
    import gristmill.core.events.handled
    import gristmill.core.events.outbox  # noqa: F401

    return Base.metadata


def has_migrations(service: str) -> bool:
    try:
        importlib.import_module(migrations_package(service))
    except ModuleNotFoundError as exc:
        if exc.name is not None and migrations_package(service).startswith(exc.name):
            return False
        raise
    return True


class SchemaMigrations:
    """One service's migrations and the metadata they must produce."""

    def __init__(self, service: str, tables: Sequence[MetaData] = (), *, package: str | None = None) -> None:
        self.service = service
        self.package = package or migrations_package(service)
        module = importlib.import_module(self.package)
        if module.__file__ is None:
            raise ConfigurationError(f"{self.package} is not a regular package (no __init__.py)")
        self.directory = Path(module.__file__).parent
        shared = shared_metadata()
        self.metadatas: tuple[MetaData, ...] = (shared, *(md for md in tables if md is not shared))
        self.version_table = f"alembic_version_{service}"

    # -- Alembic plumbing ----------------------------------------------------------------------------------

    def config(self, connection: Connection | None = None) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(self.directory))
        cfg.attributes[_CONNECTION] = connection
        cfg.attributes[_MIGRATIONS] = self
        return cfg

    def script(self) -> ScriptDirectory:
        return ScriptDirectory.from_config(self.config())

    def context_options(self) -> dict[str, Any]:
        """What ``MigrationContext``/``context.configure`` get, the same for running and comparing."""
        return {
            "target_metadata": list(self.metadatas),
            "version_table": self.version_table,
            # SQLite alters a table by copying it; batch mode does that for the ALTERs of future revisions.
            "render_as_batch": True,
            "compare_type": True,
            "compare_server_default": True,
        }

    def head(self) -> str | None:
        return self.script().get_current_head()

    @contextmanager
    def _locked(self, database: Database) -> Iterator[Connection]:
        """A connection in a transaction, committed at the end; on PostgreSQL it holds an advisory lock so that
        two processes of the same service starting at once do not migrate the same database together."""
        with database.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                key = zlib.crc32(f"gristmill-migrations-{self.service}".encode())
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield conn
            conn.commit()

    def _run(self, database: Database, name: str, revision: str) -> None:
        with self._locked(database) as conn:
            getattr(command, name)(self.config(conn), revision)

    # -- operations ----------------------------------------------------------------------------------------

    def current(self, database: Database) -> str | None:
        with database.engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": self.version_table}).get_current_revision()

    def upgrade(self, database: Database, revision: str = "head") -> None:
        self._run(database, "upgrade", revision)

    def downgrade(self, database: Database, revision: str = "base") -> None:
        self._run(database, "downgrade", revision)

    def stamp(self, database: Database, revision: str = "head") -> None:
        self._run(database, "stamp", revision)

    def differences(self, database: Database) -> list[Any]:
        """What ``alembic.autogenerate.compare_metadata`` finds between the database and the models (empty when
        they agree). Alembic leaves the version table out."""
        with database.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts=self.context_options())
            return list(compare_metadata(context, self.metadatas))  # type: ignore[arg-type]

    def upgrade_to_head(self, database: Database) -> str:
        """Bring the database to head (see the module's docstring); returns what was done, for the log."""
        where = database.engine.url.render_as_string(hide_password=True)
        head = self.head()
        with self._locked(database) as conn:
            existing = set(sa_inspect(conn).get_table_names())
            ours = {t for md in self.metadatas for t in md.tables}
            context = MigrationContext.configure(conn, opts={"version_table": self.version_table})
            current = context.get_current_revision() if self.version_table in existing else None
            if self.version_table in existing and current is not None:
                try:
                    self.script().get_revision(current)
                except CommandError:
                    raise ConfigurationError(
                        f"the {self.service} database {where} is at schema revision {current}, which this release "
                        f"does not know (its newest is {head}): it was written by a newer Gristmill release; "
                        "start that release, or point the service's _DATABASE_URL (or _DATA_DIR) at a new "
                        "database; nothing was changed"
                    ) from None
                if current == head:
                    return f"schema at head {head}"
                command.upgrade(self.config(conn), "head")
                done = f"schema upgraded from {current} to {head}"
            elif existing & ours:
                # Made by create_all before this service had migrations: adopt it when it holds what we read.
                database.check_schema(*self.metadatas)
                for md in self.metadatas:
                    md.create_all(conn)
                command.stamp(self.config(conn), "head")
                done = f"existing tables adopted without migrating: stamped schema head {head}"
                log.warning("%s database %s had tables but no %s: %s", self.service, where, self.version_table, done)
                context = MigrationContext.configure(conn, opts=self.context_options())
                if drift := compare_metadata(context, self.metadatas):  # type: ignore[arg-type]
                    # create_all never changed an existing table either: say what differs, do not refuse.
                    log.warning("%s database %s differs from head in: %s", self.service, where, drift)
            else:
                command.upgrade(self.config(conn), "head")
                done = f"schema created at head {head}"
        log.info("%s database %s: %s", self.service, where, done)
        return done

    # -- writing a revision (development) ------------------------------------------------------------------

    def write_revision(self, message: str, *, rev_id: str | None = None) -> Path:
        """Autogenerate the next revision from the difference between head and the models: upgrades a scratch
        SQLite database to head, compares, and writes ``versions/<rev>_<slug>.py``. Review it before committing
        (Alembic cannot see renames, and server defaults and types may need care)."""
        down = self.head()
        with tempfile.TemporaryDirectory() as scratch:
            database = Database(f"sqlite:///{scratch}/scratch.db")
            try:
                if down is not None:
                    self.upgrade(database)
                with database.engine.connect() as conn:
                    context = MigrationContext.configure(conn, opts=self.context_options())
                    script = produce_migrations(context, self.metadatas)  # type: ignore[arg-type]
            finally:
                database.dispose()
        assert script.upgrade_ops is not None and script.downgrade_ops is not None
        if script.upgrade_ops.is_empty():
            raise ConfigurationError(f"the {self.service} models equal the schema at head {down}: nothing to write")
        rev = rev_id or uuid.uuid4().hex[:12]
        slug = "_".join("".join(c if c.isalnum() else " " for c in message.lower()).split())[:40] or "revision"
        upgrade = render_python_code(script.upgrade_ops, render_as_batch=True, render_item=_render_item)
        downgrade = render_python_code(script.downgrade_ops, render_as_batch=True, render_item=_render_item)
        path = self.directory / "versions" / f"{rev}_{slug}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            _REVISION_TEMPLATE.format(
                message=message,
                service=self.service,
                rev=rev,
                down=down,
                date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                upgrade=_indent(upgrade),
                downgrade=_indent(downgrade),
            )
        )
        return path


def upgrade_to_head(database: Database, service: str, tables: Sequence[MetaData] = ()) -> str:
    """Bring a service's database to its schema at start: its migrations when it has a migrations package,
    else ``create_all`` (services and tests without one)."""
    if not has_migrations(service):
        database.create_all(*tables)
        return "tables created (no migrations package)"
    return SchemaMigrations(service, tables).upgrade_to_head(database)


def run_env() -> None:
    """The body of every service's ``env.py``: runs the migrations on the connection ``SchemaMigrations``
    gives (online only: the services migrate their own database at start)."""
    from alembic import context

    config = context.config
    migrations = config.attributes.get(_MIGRATIONS)
    connection = config.attributes.get(_CONNECTION)
    if not isinstance(migrations, SchemaMigrations) or connection is None:
        raise ConfigurationError(
            "a Gristmill service's migrations run through gristmill.core.migrations "
            "(python -m gristmill.core.migrations ...), not the alembic command with an alembic.ini"
        )
    context.configure(connection=connection, **migrations.context_options())
    with context.begin_transaction():
        context.run_migrations()


def _render_item(kind: str, obj: Any, _context: Any) -> str | Literal[False]:
    """A revision must not import the models (they move and change; the revision stays): a type of our own
    (a ``TypeDecorator``) is written as the SQLAlchemy type it stores as."""
    if kind == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl_instance!r}"
    return False


def _indent(code: str) -> str:
    lines = [line for line in code.strip("\n").splitlines() if not line.lstrip().startswith("# ###")]
    return "\n".join(f"    {line.strip()}" if not line.startswith("    ") else line for line in lines) or "    pass"


_REVISION_TEMPLATE = '''"""{service}: {message}

Revision ID: {rev}
Revises: {down}
Create Date: {date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "{rev}"
down_revision: str | None = {down!r}
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
{upgrade}


def downgrade() -> None:
{downgrade}
'''


def main(argv: Sequence[str] | None = None) -> None:
    """Developer commands: ``revision`` writes the next migration; the others act on a database URL."""
    parser = argparse.ArgumentParser(prog="python -m gristmill.core.migrations", description=main.__doc__)
    parser.add_argument("command", choices=("revision", "upgrade", "downgrade", "stamp", "current", "check"))
    parser.add_argument("service", help="labeling, training, registry, serving or admin")
    parser.add_argument("-m", "--message", default="", help="revision: what changed")
    parser.add_argument("--rev-id", default=None, help="revision: its id (default: random)")
    parser.add_argument("--url", default="", help="the database (upgrade, downgrade, stamp, current, check)")
    parser.add_argument("--revision", default="", help="upgrade/stamp: default head; downgrade: default base")
    args = parser.parse_args(argv)
    tables = importlib.import_module(migrations_package(args.service)).target_metadata()
    migrations = SchemaMigrations(args.service, tables)
    if args.command == "revision":
        if not args.message:
            parser.error("revision needs -m/--message")
        print(migrations.write_revision(args.message, rev_id=args.rev_id))
        return
    if not args.url:
        parser.error(f"{args.command} needs --url")
    database = Database(args.url)
    try:
        if args.command == "current":
            print(migrations.current(database) or "(none)")
        elif args.command == "check":
            diffs = migrations.differences(database)
            for diff in diffs:
                print(diff)
            raise SystemExit(1 if diffs else 0)
        elif args.command == "downgrade":
            migrations.downgrade(database, args.revision or "base")
        else:
            getattr(migrations, args.command)(database, args.revision or "head")
    finally:
        database.dispose()


if __name__ == "__main__":
    # The module's own instance, not __main__'s: each env.py imports gristmill.core.migrations, and its
    # run_env must recognise the SchemaMigrations that main makes.
    from gristmill.core import migrations as _module

    _module.main()
