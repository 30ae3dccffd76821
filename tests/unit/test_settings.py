from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from gristmill.core.errors import ConfigurationError
from gristmill.core.settings import KafkaSettings, S3Settings, ServiceSettings, load_settings


class LabelingLikeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_SAMPLE_", extra="ignore", frozen=True)


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(LabelingLikeSettings)
    assert settings.grpc_port == 50051
    assert settings.resolved_database_url("sample") == "sqlite:///.data/sample.db"


def test_values_come_from_the_service_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_SAMPLE_GRPC_PORT", "6000")
    monkeypatch.setenv("GRISTMILL_SAMPLE_DATA_DIR", "/tmp/x")
    monkeypatch.setenv("GRISTMILL_SAMPLE_DATABASE_URL", "postgresql://db/sample")
    settings = load_settings(LabelingLikeSettings)
    assert settings.grpc_port == 6000
    assert settings.data_dir == Path("/tmp/x")
    assert settings.resolved_database_url("sample") == "postgresql://db/sample"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("GRISTMILL_SAMPLE_GRPC_PORT", "abc", "GRISTMILL_SAMPLE_GRPC_PORT='abc'"),
        ("GRISTMILL_SAMPLE_GRPC_PORT", "70000", "GRISTMILL_SAMPLE_GRPC_PORT='70000'"),
        ("GRISTMILL_SAMPLE_LOG_LEVEL", "LOUD", "GRISTMILL_SAMPLE_LOG_LEVEL='LOUD'"),
        ("GRISTMILL_SAMPLE_SHUTDOWN_GRACE_S", "-1", "GRISTMILL_SAMPLE_SHUTDOWN_GRACE_S='-1'"),
    ],
)
def test_bad_values_fail_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigurationError) as err:
        load_settings(LabelingLikeSettings)
    message = str(err.value)
    assert message.startswith("invalid setting ")
    assert expected in message
    assert "\n" not in message, "a settings error is one line"


def test_shared_infrastructure_settings_have_their_own_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("GRISTMILL_S3_ENDPOINT", "127.0.0.1:8333")
    monkeypatch.setenv("GRISTMILL_S3_SECRET_KEY", "s3cret")
    assert load_settings(KafkaSettings).bootstrap_servers == "127.0.0.1:9092"
    s3 = load_settings(S3Settings)
    assert s3.endpoint == "127.0.0.1:8333"
    assert "s3cret" not in repr(s3), "secrets must not appear in logs or reprs"
    monkeypatch.setenv("GRISTMILL_KAFKA_REQUEST_TIMEOUT_MS", "5")
    with pytest.raises(ConfigurationError, match="GRISTMILL_KAFKA_REQUEST_TIMEOUT_MS"):
        load_settings(KafkaSettings)


def test_invalid_bucket_name_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_S3_BUCKET", "x")
    with pytest.raises(ConfigurationError, match="GRISTMILL_S3_BUCKET='x'"):
        load_settings(S3Settings)
