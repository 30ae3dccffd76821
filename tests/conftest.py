"""Fixtures shared by every test suite.

Integration tests talk to the real servers that ``make test`` starts (deploy/local/stack.sh). A test
whose server is missing FAILS with a one-line reason; it never skips, with or without ``CI=true``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# No model hub is reachable, or needed: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def require_server(name: str, address: str) -> None:
    """Fail (never skip) when a server the test needs is not listening."""
    host, port = _host_port(address)
    if not _reachable(host, port):
        pytest.fail(
            f"{name} is not reachable at {address}: run the tests with `make test` "
            f"(it starts Kafka and SeaweedFS) or start them with `deploy/local/stack.sh up`",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The real Kafka broker's bootstrap address."""
    port = os.environ.get("GRISTMILL_KAFKA_PORT", "9092")
    address = os.environ.get("GRISTMILL_KAFKA_BOOTSTRAP_SERVERS") or f"127.0.0.1:{port}"
    require_server("Kafka", address)
    return address


@pytest.fixture(scope="session")
def s3_endpoint() -> dict[str, str]:
    """The real S3 server (SeaweedFS) endpoint and credentials."""
    port = os.environ.get("GRISTMILL_S3_PORT", "8333")
    endpoint = os.environ.get("GRISTMILL_S3_ENDPOINT") or f"127.0.0.1:{port}"
    require_server("the S3 server", endpoint)
    return {
        "endpoint": endpoint,
        "access_key": os.environ.get("GRISTMILL_S3_ACCESS_KEY", "gristmill"),
        "secret_key": os.environ.get("GRISTMILL_S3_SECRET_KEY", "gristmill-secret"),
    }


@pytest.fixture
def tracing() -> Iterator[tuple[object, object]]:
    """A tracer provider with an in-memory exporter: yields (provider, exporter)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# `make test` runs the suite on two pytest-xdist workers: most tests wait on a broker, a socket or a subprocess
# for much of their time, so two workers on two cores finish in much less wall time. Tests that start a Ray
# cluster of their own, or a whole platform, cost both cores for minutes: each such family is one unit of work,
# run on one worker in order, so two of them never fight over the cores and a 60 s Ray placement timeout means
# what it meant when they ran alone. Every other file is a unit of its own (its module fixtures are built once).
# (xdist's own `xdist_group` marks cannot do this with pytest 9.2: xdist renames a test through `_nodeid`,
# which pytest no longer reads.)
SERIAL_UNITS = {
    "ray": (
        "services/training/tests/integration/",
        "services/training/tests/unit/test_local_ray.py",
        "services/training/tests/unit/test_ray_start.py",
    ),
    # test_cli*.py and the console on the platform share one embedded platform (a session fixture): one worker
    # starts it once.
    "platform": ("tests/e2e/", "tests/integration/test_cli", "tests/integration/test_console_platform.py"),
}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its serial family, or else its file."""
    path = nodeid.split("::", 1)[0]
    for unit, prefixes in SERIAL_UNITS.items():
        if path.startswith(prefixes):
            return unit
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class SerialFamilies(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SerialFamilies(config, log)


# Store tests: ``database_url`` is an empty SQLite or PostgreSQL database (parametrised over both).
from tests.support.databases import database_url  # noqa: E402, F401
