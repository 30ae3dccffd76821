"""Fixtures for the console's tests: the real servers' addresses (tests/conftest.py)."""

from tests.conftest import kafka_bootstrap, s3_endpoint  # noqa: F401
