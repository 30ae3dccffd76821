"""The registry's aggregate services, built together over one store so that they share a clock and a licence.

Each RPC and event handler calls the aggregate that owns its operation; this only holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gristmill.core.licensing import License, load_license
from gristmill.core.storage import ObjectStore
from gristmill.core.values import utc_now
from gristmill.registry.domain.basemodels import BaseModels
from gristmill.registry.domain.cards import ModelCards
from gristmill.registry.domain.catalog import ModelCatalog
from gristmill.registry.domain.ports import RegistryStore
from gristmill.registry.domain.promotion import Promotions
from gristmill.registry.domain.registration import Registrations


@dataclass(frozen=True)
class RegistryServices:
    catalog: ModelCatalog
    registrations: Registrations
    promotions: Promotions
    cards: ModelCards
    base_models: BaseModels

    @classmethod
    def create(
        cls,
        store: RegistryStore,
        objects: ObjectStore,
        *,
        clock: Callable[[], datetime] = utc_now,
        allow_local_paths: bool = False,
        license_: License | None = None,
    ) -> RegistryServices:
        # Enterprise licence limits (max_registered_models); the community edition's without one.
        license_ = license_ or load_license(None, "")
        return cls(
            catalog=ModelCatalog(store, clock=clock, license_=license_),
            registrations=Registrations(store, objects, clock=clock, license_=license_),
            promotions=Promotions(store, clock=clock),
            cards=ModelCards(store, objects, clock=clock),
            base_models=BaseModels(store, objects, clock=clock, allow_local_paths=allow_local_paths),
        )
