"""Fixtures for the registry's tests (helpers live in support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.registry.tests.support import Env, make_env
from tests.conftest import kafka_bootstrap, s3_endpoint, tracing  # noqa: F401
from tests.support.databases import database_url  # noqa: F401


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    built = make_env(tmp_path)
    yield built
    built.database.dispose()
