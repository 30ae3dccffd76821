"""Fixtures for the serving service's tests (fakes and helpers live in support.py)."""

from __future__ import annotations

from tests.conftest import kafka_bootstrap, s3_endpoint, tracing  # noqa: F401
