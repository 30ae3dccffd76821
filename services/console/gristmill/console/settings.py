"""The console's settings (environment prefix ``GRISTMILL_CONSOLE_``), read only in ``__main__``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gristmill.core.ports import CONSOLE_PORT, default_address


class ConsoleSettings(BaseSettings):
    """The console keeps no data: no database, no data directory. Its sessions are sealed cookies."""

    # (Each ``*_address`` is where that service listens; the pages of a service that does not answer say so.)

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_CONSOLE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    http_port: int = Field(default=CONSOLE_PORT, ge=0, le=65535)
    labeling_address: str = default_address("labeling")
    admin_address: str = default_address("admin")
    training_address: str = default_address("training")
    registry_address: str = default_address("registry")
    serving_address: str = default_address("serving")
    # Seals the session cookies. Empty: a random one per process (a restart signs everyone out; several replicas
    # behind one address need the same secret).
    session_secret: SecretStr = SecretStr("")
    # A session ends this long after sign-in.
    session_max_age_s: int = Field(default=12 * 3600, ge=60)
    # Cookies only over HTTPS. Off on loopback (the embedded platform); on behind a TLS-terminating proxy.
    secure_cookies: bool = False
    # Seconds each call to a service may take.
    call_timeout_s: float = Field(default=10.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: float = Field(default=10.0, ge=0)
