"""Fixtures of labeling's integration tests: the labeling service on real Kafka and S3, over real gRPC."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from pydantic import SecretStr

from gristmill.core.host import Infrastructure, ServiceHost
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.labeling.app import build_app
from gristmill.labeling.settings import LabelingSettings


@pytest.fixture
def s3(s3_endpoint: dict[str, str]) -> S3Settings:
    return S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )


@pytest.fixture
async def host(
    tmp_path: Path, kafka_bootstrap: str, s3: S3Settings, tracing: tuple[TracerProvider, Any]
) -> AsyncIterator[ServiceHost]:
    run = uuid.uuid4().hex[:8]
    settings = LabelingSettings(
        data_dir=tmp_path / "service",
        grpc_port=0,
        active_learning_group=f"labeling-it-{run}",
        feedback_group=f"labeling-feedback-it-{run}",
    )
    infra = Infrastructure(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), s3=s3, tracer_provider=tracing[0])
    service = build_app(settings, infra, embedded_security("labeling")).host
    await service.start()
    yield service
    await service.stop()
