"""Settings, read once at start.

Each service subclasses ``ServiceSettings`` with its own ``env_prefix`` (``GRISTMILL_LABELING_`` …);
the shared infrastructure settings (Kafka, S3, telemetry) have prefixes of their own so that one
environment configures every service. Only a service's ``__main__`` calls ``load_settings``; everything
else receives the settings object, and tests build them directly.

A bad value fails at start with one line naming the environment variable, e.g.::

    invalid setting GRISTMILL_LABELING_GRPC_PORT='abc': Input should be a valid integer
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gristmill.core.errors import ConfigurationError
from gristmill.core.ports import LABELING_PORT


class KafkaSettings(BaseSettings):
    """Where the event bus lives. ``bootstrap_servers`` empty means the in-process bus (embedded mode)."""

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_KAFKA_", extra="ignore", frozen=True)

    # host:port of the brokers, comma-separated; on a cluster name them all (any one that answers will do).
    bootstrap_servers: str = ""
    client_id: str = "gristmill"
    # How long the producer waits for the broker before a publish counts as failed (the outbox retries).
    request_timeout_ms: int = Field(default=15_000, ge=1_000)
    topic_partitions: int = Field(default=3, ge=1)
    # How long the broker keeps a consumer that stopped heartbeating in its group. A service that dies without
    # leaving (SIGKILL, OOM, a lost node) holds its partitions that long, and its restarted self joins a group
    # that waits for the dead member: at Kafka's 45 s default a restarted registry sat ~30 s with no partitions
    # (the e2e chat demo). kafka-python heartbeats from a thread of its own, every 3 s, whatever the handlers
    # do, so 10 s (Kafka's default before 3.0) is safe; raise it where networks pause longer. At least the
    # broker's group.min.session.timeout.ms (6 s by default).
    session_timeout_ms: int = Field(default=10_000, ge=6_000)


class S3Settings(BaseSettings):
    """Object store. ``endpoint`` empty means the local-disk store under the data directory."""

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_S3_", extra="ignore", frozen=True)

    endpoint: str = ""
    access_key: str = ""
    secret_key: SecretStr = SecretStr("")
    # S3 bucket naming rules: 3-63 lower-case letters, digits, '.' or '-'.
    bucket: str = Field(default="gristmill", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    secure: bool = False
    region: str = "us-east-1"


class TelemetrySettings(BaseSettings):
    """OpenTelemetry. The standard OTEL_EXPORTER_OTLP_ENDPOINT switches the OTLP exporter on."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore", frozen=True)

    exporter_otlp_endpoint: str = ""
    service_name: str = ""


class LicenseSettings(BaseSettings):
    """Enterprise licence: no file runs the community edition (see ``gristmill.core.licensing``).

    The vendor's keys that verify it ship inside the package; no setting can add one outside the development
    mode."""

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_LICENSE_", extra="ignore", frozen=True)

    file: Path | None = None
    # Development mode: one more trusted key (base64 of its 32 raw Ed25519 bytes), logged at WARNING at every
    # start and reported by LicenseService. Never in production.
    development_key: str = ""
    # The former way to trust a key. Read only to refuse it at start (``load_security``): ignoring it would
    # leave an operator believing their key is trusted, trusting it would let anyone sign their own licence.
    public_key: str = ""


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``model_config`` with their own ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    # Each service's settings default to its own port (gristmill.core.ports).
    grpc_port: int = Field(default=LABELING_PORT, ge=0, le=65535)
    # 0 disables the Prometheus endpoint (tests); a port number serves /metrics there.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    data_dir: Path = Path(".data")
    database_url: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Seconds that in-flight calls get to finish after SIGTERM.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Seconds the outbox relay lets a commit's events wait for later ones before publishing them together (0: at
    # once). Services whose events follow requests one for one (serving's usage) batch them this way.
    outbox_linger_s: float = Field(default=0.0, ge=0, le=5)

    def resolved_database_url(self, service: str) -> str:
        """The configured URL, or a SQLite file per service under the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / f'{service}.db').as_posix()}"


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S]) -> S:
    """Read ``cls`` from the environment; raise ``ConfigurationError`` naming the bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        raise ConfigurationError(_describe(cls, exc)) from None


def _describe(cls: type[BaseSettings], exc: ValidationError) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"])
        var = f"{prefix}{field}".upper()
        shown = err.get("input")
        value = f"={shown!r}" if isinstance(shown, str | int | float) else ""
        problems.append(f"{var}{value}: {err['msg']}")
    return "invalid setting " + "; ".join(problems)
