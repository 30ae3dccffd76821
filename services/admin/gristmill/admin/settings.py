"""The admin service's settings (environment prefix ``GRISTMILL_ADMIN_``), read only in ``__main__``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gristmill.core.events.topics import ADMIN_METERING
from gristmill.core.ports import ADMIN_PORT
from gristmill.core.settings import ServiceSettings


class AdminSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_ADMIN_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=ADMIN_PORT, ge=0, le=65535)
    # The installation's own organisation: its admin keys manage every organisation.
    root_organization_id: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")
    # Where the first start writes the root organisation's first admin key (mode 0600).
    # Empty: <data dir>/root-admin.key.
    bootstrap_key_file: Path | None = None
    # Consumer group of the usage aggregator; one per installation (tests give each run its own).
    metering_group: str = ADMIN_METERING.default

    def resolved_bootstrap_key_file(self) -> Path:
        return self.bootstrap_key_file or self.data_dir / "root-admin.key"
