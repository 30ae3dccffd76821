"""``run_service``: every service's ``python -m`` set-up. A bad setting at any step is one line on stderr,
``<service>: <message>``, and exit status 2; security is closed whatever happens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from gristmill.core import service as service_module
from gristmill.core.errors import ConfigurationError
from gristmill.core.host import Infrastructure
from gristmill.core.security import Security
from gristmill.core.service import HasHost, run_service
from gristmill.core.settings import ServiceSettings, TelemetrySettings

SCOPES = {"/sample.Service/*": "admin"}


class SampleSettings(ServiceSettings):
    model_config = {**ServiceSettings.model_config, "env_prefix": "GRISTMILL_SAMPLE_"}


@pytest.fixture(autouse=True)
def embedded_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GRISTMILL_KAFKA_BOOTSTRAP_SERVERS", "GRISTMILL_S3_ENDPOINT", "GRISTMILL_LICENSE_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRISTMILL_AUTH_DISABLED", "true")
    monkeypatch.setenv("GRISTMILL_SAMPLE_DATA_DIR", str(tmp_path))
    # Logging set-up is the process's; a test must not add handlers to the root logger.
    monkeypatch.setattr(service_module, "setup_logging", lambda name, level: None)


class RanHost:
    def __init__(self) -> None:
        self.ran = False

    async def run_until_signal(self) -> None:
        self.ran = True


@dataclass
class SampleApp:
    host: RanHost


def test_a_bad_setting_is_one_line_naming_it_and_exit_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRISTMILL_SAMPLE_GRPC_PORT", "-1")

    def build(settings: SampleSettings, infra: Infrastructure, security: Security) -> HasHost:
        raise AssertionError("never built")

    assert run_service("sample", SampleSettings, build, method_scopes=SCOPES) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()], err
    assert err.startswith("sample: invalid setting GRISTMILL_SAMPLE_GRPC_PORT='-1'")


def test_a_configuration_error_while_building_is_one_line_and_security_is_closed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    closed: list[str] = []
    monkeypatch.setattr(Security, "close", lambda self: closed.append("security"))

    def build(settings: SampleSettings, infra: Infrastructure, security: Security) -> HasHost:
        assert security.auth_hook is not None
        raise ConfigurationError("the database sqlite:///x is from an older Gristmill release")

    assert run_service("sample", SampleSettings, build, method_scopes=SCOPES) == 2
    assert capsys.readouterr().err == "sample: the database sqlite:///x is from an older Gristmill release\n"
    assert closed == ["security"]


def test_a_service_is_built_from_every_setting_run_and_ends_with_status_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRISTMILL_SAMPLE_GRPC_PORT", "0")
    seen: dict[str, object] = {}
    host = RanHost()

    def build(settings: SampleSettings, infra: Infrastructure, security: Security) -> HasHost:
        seen.update(settings=settings, infra=infra, security=security)
        return SampleApp(host)  # type: ignore[return-value]

    prepared: list[int] = []
    status = run_service(
        "sample", SampleSettings, build, method_scopes=SCOPES, prepare=lambda s: prepared.append(s.grpc_port)
    )
    assert status == 0 and host.ran and prepared == [0]
    infra = seen["infra"]
    assert isinstance(seen["settings"], SampleSettings) and isinstance(infra, Infrastructure)
    assert isinstance(infra.telemetry, TelemetrySettings) and infra.embedded and not infra.s3.endpoint
    assert infra.memory_broker is None and infra.tracer_provider is None


def test_local_keys_leave_the_hook_to_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    securities: list[Security] = []

    def build(settings: SampleSettings, infra: Infrastructure, security: Security) -> HasHost:
        securities.append(security)
        return SampleApp(RanHost())  # type: ignore[return-value]

    assert run_service("sample", SampleSettings, build, method_scopes=SCOPES, local_keys=True) == 0
    assert securities[0].auth_hook is None and securities[0].auth is not None and securities[0].auth.disabled
