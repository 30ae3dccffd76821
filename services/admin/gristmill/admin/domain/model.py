"""The admin service's domain objects: organisations, API keys, usage totals and quota states.

Plans, quotas and usage kinds are the shared ones of ``gristmill.core.auth_quota`` (the services that
enforce quotas read the same types).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from gristmill.core.auth_quota import Plan, Quota, UsageKind


@dataclass(frozen=True)
class Organization:
    organization_id: str
    display_name: str
    plan: Plan
    create_time: datetime


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: everything but the secret (which is never stored) and its hash."""

    api_key_id: str
    organization_id: str
    display_name: str
    scopes: frozenset[str]
    secret_prefix: str
    create_time: datetime
    expire_time: datetime | None = None
    # Set at once by a revocation, or in the future by a rotation (the end of its grace period).
    revoke_time: datetime | None = None
    last_used_time: datetime | None = None
    rotated_from_api_key_id: str = ""

    def revoked_at(self, now: datetime) -> bool:
        return self.revoke_time is not None and self.revoke_time <= now

    def usable_at(self, now: datetime) -> bool:
        expired = self.expire_time is not None and self.expire_time <= now
        return not expired and not self.revoked_at(now)


@dataclass(frozen=True)
class StoredKey:
    key: ApiKey
    secret_hash: str = field(repr=False)


@dataclass(frozen=True)
class CreatedKey:
    """A key just created or rotated, with its secret: returned to the caller once, never stored."""

    key: ApiKey
    secret: str = field(repr=False)


class Granularity(Enum):
    # One total over the whole range.
    NONE = "none"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class UsageBucket:
    """Usage of one key (empty: not caused by a key) of one kind in one UTC hour."""

    api_key_id: str
    kind: UsageKind
    hour_start: datetime
    quantity: float


@dataclass(frozen=True)
class UsageQuery:
    organization_id: str
    api_key_id: str = ""
    kinds: tuple[UsageKind, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    granularity: Granularity = Granularity.NONE
    group_by_api_key: bool = False


@dataclass(frozen=True)
class UsageTotal:
    kind: UsageKind
    api_key_id: str
    period_start: datetime
    period_end: datetime
    quantity: float


@dataclass(frozen=True)
class QuotaStatus:
    quota: Quota
    used: float
    remaining: float
    period_end: datetime
