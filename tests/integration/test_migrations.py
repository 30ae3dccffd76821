"""Every service's Alembic migrations, on SQLite and on the real PostgreSQL server (``database_url``).

For each service: ``upgrade head`` from an empty database gives exactly the models (Alembic's own comparison
finds no difference), ``downgrade base`` and ``upgrade head`` again round-trip, and a database that
``create_all`` made before there were migrations is adopted (stamped head), while a database written by an
unknown release is refused unchanged. The models come from each service's public path (its migrations
package's ``target_metadata``, the tables its ``app.py`` hands to ``open_platform``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, text

from gristmill.core.errors import ConfigurationError
from gristmill.core.host import Infrastructure, open_platform
from gristmill.core.migrations import SchemaMigrations, migrations_package, shared_metadata
from gristmill.core.settings import ServiceSettings
from gristmill.core.sql import Database

pytestmark = pytest.mark.integration

SERVICES = ("labeling", "training", "registry", "serving", "admin")


def service_migrations(service: str) -> SchemaMigrations:
    tables = importlib.import_module(migrations_package(service)).target_metadata()
    return SchemaMigrations(service, tables)


def table_names(database: Database) -> set[str]:
    return set(inspect(database.engine).get_table_names())


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.mark.parametrize("service", SERVICES)
def test_upgrade_head_from_empty_gives_exactly_the_models(service: str, database: Database) -> None:
    migrations = service_migrations(service)
    migrations.upgrade_to_head(database)
    assert migrations.current(database) == migrations.head() is not None
    assert migrations.differences(database) == []
    models = {name for md in migrations.metadatas for name in md.tables}
    assert table_names(database) == models | {f"alembic_version_{service}"}
    assert {"gristmill_outbox", "gristmill_handled_events"} <= models  # the shared tables are part of it


@pytest.mark.parametrize("service", SERVICES)
def test_downgrade_base_then_upgrade_head_round_trips(service: str, database: Database) -> None:
    migrations = service_migrations(service)
    migrations.upgrade(database)
    migrations.downgrade(database, "base")
    assert table_names(database) == {f"alembic_version_{service}"}
    assert migrations.current(database) is None
    migrations.upgrade(database)
    assert migrations.current(database) == migrations.head()
    assert migrations.differences(database) == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_database_made_by_create_all_is_adopted_and_stamped_head(
    service: str, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    migrations = service_migrations(service)
    database.create_all(*migrations.metadatas)  # what every release before migrations did at start
    with caplog.at_level(logging.WARNING, logger="gristmill.core.migrations"):
        done = migrations.upgrade_to_head(database)
    assert "stamped schema head" in done
    assert any("adopted" in r.getMessage() for r in caplog.records), "the adoption is logged"
    assert migrations.current(database) == migrations.head()
    assert migrations.differences(database) == []
    assert migrations.upgrade_to_head(database) == f"schema at head {migrations.head()}"


def test_an_adopted_database_gets_the_tables_it_lacked(database: Database) -> None:
    """An older create_all-made database without some table (added by a later release) is completed."""
    migrations = service_migrations("registry")
    database.create_all(shared_metadata())
    one = migrations.metadatas[1].sorted_tables[0]  # one that references no other
    one.create(database.engine)
    migrations.upgrade_to_head(database)
    assert migrations.differences(database) == []


def test_a_create_all_database_lacking_a_column_is_refused_unchanged(database: Database) -> None:
    migrations = service_migrations("serving")
    name = next(iter(migrations.metadatas[1].tables))
    Table(name, MetaData(), Column("organization_id", String(128), primary_key=True)).create(database.engine)
    before = table_names(database)
    with pytest.raises(ConfigurationError, match=f"{name} lacks"):
        migrations.upgrade_to_head(database)
    assert table_names(database) == before


def test_a_database_at_an_unknown_revision_is_refused_unchanged(database: Database) -> None:
    migrations = service_migrations("training")
    migrations.upgrade(database)
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version_training SET version_num = 'f00dfeedbeef'"))
    with pytest.raises(ConfigurationError, match="f00dfeedbeef.*newer Gristmill release"):
        migrations.upgrade_to_head(database)
    assert migrations.current(database) == "f00dfeedbeef"


def test_open_platform_brings_the_database_to_head(database_url: str, tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0, database_url=database_url)
    # Explicit empty endpoints: `make test` exports the real stack's addresses into the environment.
    platform = open_platform("serving", settings, Infrastructure(), tables=service_migrations("serving").metadatas[1:])
    try:
        migrations = service_migrations("serving")
        assert migrations.current(platform.database) == migrations.head()
        assert migrations.differences(platform.database) == []
    finally:
        platform.close()


def test_a_service_without_migrations_gets_create_all(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, grpc_port=0)
    sample = MetaData()
    Table("sample_rows", sample, Column("id", Integer, primary_key=True))
    platform = open_platform("sample", settings, Infrastructure(), tables=[sample])
    try:
        assert {"sample_rows", "gristmill_outbox"} <= table_names(platform.database)
        assert not any(name.startswith("alembic_version") for name in table_names(platform.database))
    finally:
        platform.close()
