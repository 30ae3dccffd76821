"""The admin service's store port: organisations, API keys (hashed) and hourly usage totals.

The domain depends on this interface; ``gristmill.admin.store`` implements it (the domain never imports it).

Implementations return domain dataclasses, never ORM rows, and raise ``gristmill.core.errors`` classes:
``AlreadyExistsError`` when an id is taken. Each method is one transaction, except ``add_usage``, which
writes through the session of the consumer's transaction (so the usage and the handled-event mark commit
together and a redelivered event is counted once).

Times may be given in any zone; they are stored, compared and returned as the same instants in UTC.

Listing methods take a ``Page`` and return ``(items, next_position)``; ``next_position`` is None on the
last page. Positions are opaque strings produced and understood only by the implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from gristmill.admin.domain.model import ApiKey, Organization, StoredKey, UsageBucket
from gristmill.core.auth_quota import Plan, UsageKind
from gristmill.core.paging import Page

if TYPE_CHECKING:  # the domain imports this interface and must not import SQLAlchemy
    from sqlalchemy.orm import Session


class AdminStore(ABC):
    # -- organisations -----------------------------------------------------------------------------------

    @abstractmethod
    def insert_organization(self, organization: Organization) -> Organization:
        """``AlreadyExistsError`` when the id is taken."""

    @abstractmethod
    def get_organization(self, organization_id: str) -> Organization | None: ...

    @abstractmethod
    def list_organizations(self, page: Page) -> tuple[list[Organization], str | None]:
        """By id."""

    @abstractmethod
    def set_plan(self, organization_id: str, plan: Plan) -> Organization | None:
        """None when the organisation does not exist."""

    # -- API keys ------------------------------------------------------------------------------------------

    @abstractmethod
    def insert_key(self, key: ApiKey, secret_hash: str) -> ApiKey: ...

    @abstractmethod
    def get_key(self, api_key_id: str) -> StoredKey | None: ...

    @abstractmethod
    def count_keys(self, organization_id: str) -> int:
        """Every key of the organisation, revoked ones included."""

    @abstractmethod
    def list_keys(
        self, organization_id: str, *, include_revoked_before: datetime | None, page: Page
    ) -> tuple[list[ApiKey], str | None]:
        """Newest first. ``include_revoked_before``: leave out keys revoked at or before that time (None: keep all)."""

    @abstractmethod
    def rotate_key(self, old_api_key_id: str, old_revoke_time: datetime, new: ApiKey, secret_hash: str) -> ApiKey:
        """In one transaction: schedule the old key's revocation (unless it is revoked earlier) and insert the new
        key; ``AlreadyExistsError`` (and no change) when the new key's id is taken."""

    @abstractmethod
    def revoke_key(self, api_key_id: str, at: datetime) -> ApiKey | None:
        """Revoke at ``at`` unless already revoked by then; the key as it is afterwards (None: unknown)."""

    @abstractmethod
    def touch_key(self, api_key_id: str, at: datetime) -> None:
        """Record a use of the key."""

    # -- usage ---------------------------------------------------------------------------------------------

    @abstractmethod
    def add_usage(
        self,
        session: Session,
        organization_id: str,
        api_key_id: str,
        kind: UsageKind,
        hour_start: datetime,
        quantity: float,
    ) -> None:
        """Add to an hourly total, through the consumer's ``session`` (an open transaction). Concurrent additions
        to one total, from other transactions, are all kept."""

    @abstractmethod
    def usage(
        self,
        organization_id: str,
        *,
        api_key_id: str,
        kinds: Sequence[UsageKind],
        start: datetime,
        end: datetime,
    ) -> list[UsageBucket]:
        """Hourly totals with ``start <= hour_start < end``; of one key when ``api_key_id`` is set, of ``kinds``
        only when it is not empty. By hour, then kind, then key."""
