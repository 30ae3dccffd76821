"""The deployment store port.

The domain depends on this interface; ``gristmill.serving.store`` implements it (the domain never imports it).

It keeps what must survive a restart: each deployment's spec (so the process serves the same deployments
after a restart) and, per registered model and alias, the sequence of the last ``alias changed`` event
applied (so an older event, arriving late, never moves a deployment back). Several replicas of the service
may share one store: each applies every event (in a consumer group of its own, which skips a redelivered
``event-id``), so the same sequence applies again, and only an older one is refused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from gristmill.serving.domain.model import DeploymentSpec

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class DeploymentStore(ABC):
    """Errors: ``AlreadyExistsError`` (create of a taken name), ``NotFoundError`` (unknown deployment). Times
    may be given in any zone and come back as the same instants in UTC; ``update`` keeps the creation time."""

    @abstractmethod
    def create(self, spec: DeploymentSpec) -> None: ...

    @abstractmethod
    def update(self, spec: DeploymentSpec) -> None: ...

    @abstractmethod
    def get(self, organization_id: str, name: str) -> DeploymentSpec: ...

    @abstractmethod
    def list_page(self, organization_id: str, *, after: str = "", limit: int = 50) -> list[DeploymentSpec]:
        """The organisation's deployments by name, those after ``after`` only, at most ``limit``."""

    @abstractmethod
    def list_all(self) -> list[DeploymentSpec]:
        """Every deployment of every organisation (restored at start)."""

    @abstractmethod
    def delete(self, organization_id: str, name: str) -> None: ...

    @abstractmethod
    def apply_alias_sequence(
        self, session: Session, organization_id: str, registered_model_name: str, alias: str, sequence: int
    ) -> bool:
        """Record ``sequence`` as applied, in the caller's transaction; False if a newer one was (the same one
        applies again: each replica sharing the store applies every event). A compare-and-set: of concurrent
        transactions, an older sequence never replaces a newer one."""
