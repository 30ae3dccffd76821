"""Fixtures of the console's integration tests (builders in ../support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.console.tests.support import Stack, running_stack


@pytest.fixture
async def stack(tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path, kafka_bootstrap, s3_endpoint) as built:
        yield built
