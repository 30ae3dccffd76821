from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import String, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gristmill.core.errors import ConfigurationError, InvalidArgumentError
from gristmill.core.ids import new_id, validate_id
from gristmill.core.sql import Database


@pytest.mark.parametrize("good", ["sentiment", "proj-1", "a.b_c", "0abc"])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


def test_generated_ids_are_valid() -> None:
    # Not a parameter: test ids must be the same in every collection (pytest-xdist compares its workers').
    generated = new_id()
    assert validate_id(generated) == generated


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "A", "-lead", "a..b", "x" * 129, "a\x00", "sp ace"])
def test_invalid_ids_are_refused_with_the_field_name(bad: str) -> None:
    with pytest.raises(InvalidArgumentError, match="project_id"):
        validate_id(bad, what="project_id")


class _Base(DeclarativeBase):
    pass


class _Thing(_Base):
    __tablename__ = "things"
    name: Mapped[str] = mapped_column(String, primary_key=True)


def test_transaction_commits_or_rolls_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/nested/dir/service.db")
    db.create_all(_Base.metadata)
    with db.transaction() as session:
        session.add(_Thing(name="kept"))
    with pytest.raises(RuntimeError), db.transaction() as session:
        session.add(_Thing(name="lost"))
        session.flush()
        raise RuntimeError("boom")
    with db.transaction() as session:
        assert session.scalars(select(_Thing.name)).all() == ["kept"]
    db.dispose()


def test_bad_database_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not valid"):
        Database("not a url")


def test_a_database_of_an_older_release_is_refused_at_start_and_left_unchanged(tmp_path: Path) -> None:
    """An older release wrote ``things`` without the ``colour`` column this release reads: the service must not
    start on it (create_all never alters an existing table, so it would fail or skip rows at the first query)."""
    url = f"sqlite:///{tmp_path}/service.db"
    old = Database(url)
    old.create_all(_Base.metadata)
    with old.transaction() as session:
        session.add(_Thing(name="written by the old release"))
    old.dispose()

    class _NewBase(DeclarativeBase):
        pass

    class _NewThing(_NewBase):
        __tablename__ = "things"
        name: Mapped[str] = mapped_column(String, primary_key=True)
        colour: Mapped[str] = mapped_column(String, default="")

    class _NewTable(_NewBase):
        __tablename__ = "new_things"
        name: Mapped[str] = mapped_column(String, primary_key=True)

    new = Database(url)
    with pytest.raises(ConfigurationError, match=r"older Gristmill release .*\(things lacks colour\).*nothing was"):
        new.create_all(_NewBase.metadata)
    with new.transaction() as session:
        assert session.scalars(select(_Thing.name)).all() == ["written by the old release"]
    assert "new_things" not in inspect(new.engine).get_table_names(), "refused before creating anything"
    new.create_all(_Base.metadata)  # the release that wrote it still starts
    new.dispose()
