"""Databases for store tests: a fresh SQLite file, or a fresh database on the real PostgreSQL server.

``make test`` starts PostgreSQL (deploy/local/postgres.sh, part of deploy/local/stack.sh) and tests reach it
through ``GRISTMILL_TEST_POSTGRES_URL`` (a URL of a role allowed to create databases, which the Makefile exports;
default ``postgresql+psycopg://gristmill@127.0.0.1:<GRISTMILL_POSTGRES_PORT or 5433>/postgres``, the stack's
server). A test whose server is missing FAILS, never skips.
Each test gets a database of its own, dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from gristmill.core.migrations import upgrade_to_head
from gristmill.core.sql import Database

BACKENDS = ("sqlite", "postgresql")
DEFAULT_POSTGRES_URL = "postgresql+psycopg://gristmill@127.0.0.1:5433/postgres"


def postgres_admin_url() -> str:
    if url := os.environ.get("GRISTMILL_TEST_POSTGRES_URL"):
        return url
    port = os.environ.get("GRISTMILL_POSTGRES_PORT")
    return DEFAULT_POSTGRES_URL.replace(":5433/", f":{port}/") if port else DEFAULT_POSTGRES_URL


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: parametrised over SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    yield from fresh_postgres_database()


def fresh_postgres_database() -> Iterator[str]:
    admin_url = make_url(postgres_admin_url())
    name = f"t_{uuid.uuid4().hex[:16]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        engine.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {admin_url.render_as_string(hide_password=True)} "
            f"({str(exc.orig).strip().splitlines()[0]}): run the tests with `make test` or start it with "
            "`deploy/local/stack.sh up`",
            pytrace=False,
        )
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def migrated_database(url: str, service: str) -> Database:
    """A ``Database`` at ``url`` brought to ``service``'s schema by its migrations, as the service does at start
    (so store tests run on the schema the migrations make, not on one ``create_all`` makes)."""
    database = Database(url)
    upgrade_to_head(database, service)
    return database
