"""Fixtures for the registry's tests (helpers live in support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from services.registry.tests.api import Api
from services.registry.tests.support import Env, make_env
from tests.conftest import kafka_bootstrap, s3_endpoint, tracing  # noqa: F401
from tests.support.databases import database_url  # noqa: F401


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    built = make_env(tmp_path)
    yield built
    built.database.dispose()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = RegistrySettings(data_dir=tmp_path / "data", grpc_port=0, allow_local_paths=True)
    app = build_app(settings, Infrastructure(), embedded_security("registry"))
    port = await app.host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Api(app, pb_grpc.RegistryServiceStub(channel), tmp_path)
    await app.servicer.drain()
    await app.host.stop()
