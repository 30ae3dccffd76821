"""The registry's settings (environment prefix ``GRISTMILL_REGISTRY_``), read only in ``__main__``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gristmill.core.events.topics import REGISTRY_JOB_EVENTS, REGISTRY_ONLINE_GATE, REGISTRY_PROMOTION
from gristmill.core.ports import REGISTRY_PORT
from gristmill.core.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_REGISTRY_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=REGISTRY_PORT, ge=0, le=65535)
    # ImportBaseModel(local_path=...) reads a directory on this host: only sensible in the embedded and
    # local modes, and off by default so a networked registry never reads its own disk for a caller.
    allow_local_paths: bool = False
    # Versions left PENDING (a restart, an object-store outage) are verified again every
    # ``verification_retry_s`` once unchanged for ``verification_stale_s`` (so in-flight copies are left alone).
    verification_retry_s: float = Field(default=60.0, gt=0)
    verification_stale_s: float = Field(default=300.0, ge=0)
    # Consumer groups; one per installation (tests give each run its own so that they share topics).
    job_events_group: str = REGISTRY_JOB_EVENTS.default
    promotion_group: str = REGISTRY_PROMOTION.default
    online_gate_group: str = REGISTRY_ONLINE_GATE.default
