"""Helpers every registry aggregate shares: clock, object prefixes, update masks, lookups that must exist."""

from __future__ import annotations

from gristmill.core.errors import InvalidArgumentError, NotFoundError
from gristmill.core.licensing import License
from gristmill.core.paging import Page
from gristmill.core.storage import object_key
from gristmill.core.values import DEFAULT_ORGANIZATION
from gristmill.registry.domain import names
from gristmill.registry.domain.model import ModelVersion, RegisteredModel
from gristmill.registry.domain.ports import RegistryTransaction


def artifact_prefix(org: str, model_name: str, version: int) -> str:
    """models/<model>/<version>/ for the default organisation; other organisations get their own subtree."""
    parts: tuple[str, ...] = ("models", model_name, str(version))
    if org != DEFAULT_ORGANIZATION:
        parts = ("orgs", org, *parts)
    return object_key(*parts) + "/"


def base_model_prefix(org: str, name: str) -> str:
    parts: tuple[str, ...] = ("base-models", name)
    if org != DEFAULT_ORGANIZATION:
        parts = ("orgs", org, *parts)
    return object_key(*parts) + "/"


def require_model(tx: RegistryTransaction, org: str, name: str) -> RegisteredModel:
    model = tx.get_model(org, name)
    if model is None:
        raise NotFoundError(f"registered model {name!r} does not exist")
    return model


def resolve_version(
    tx: RegistryTransaction, org: str, name: str, *, version: int | None, alias: str | None
) -> ModelVersion:
    """A version by number, by alias, or (neither) the latest READY one; NOT_FOUND naming what is missing."""
    require_model(tx, org, name)
    if alias is not None:
        names.validate_alias(alias)
        number = tx.get_alias(org, name, alias)
        if number is None:
            raise NotFoundError(f"alias {alias!r} of {name!r} does not exist")
        version = number
    if version is not None:
        names.validate_version_number(version)
        found = tx.get_version(org, name, version)
        if found is None:
            raise NotFoundError(f"version {version} of {name!r} does not exist")
        return found
    latest = tx.latest_ready_version(org, name)
    if latest is None:
        raise NotFoundError(f"registered model {name!r} has no READY version yet")
    return latest


def check_model_limit(tx: RegistryTransaction, license_: License) -> None:
    """FAILED_PRECONDITION naming the licence when one more registered model would exceed it."""
    if license_.limit("max_registered_models") is None:
        return
    # Without the lock two creators could both count N and both insert.
    tx.lock_model_count()
    license_.check_limit("max_registered_models", tx.count_models() + 1)


def check_mask(paths: list[str], allowed: tuple[str, ...], *, what: str, read_only: tuple[str, ...] = ()) -> None:
    if not paths:
        raise InvalidArgumentError(f"update_mask is empty: name the {what} fields to change ({', '.join(allowed)})")
    for path in paths:
        if path in read_only:
            raise InvalidArgumentError(
                f"update_mask path {path!r} is generated (read-only); editable: {', '.join(allowed)}"
            )
        if path not in allowed:
            raise InvalidArgumentError(
                f"update_mask path {path!r} cannot be changed on a {what}; allowed: {', '.join(allowed)}"
            )


def numeric_page(page: Page) -> Page:
    """Positions of version numbers and sequences are integers; anything else is a forged token."""
    if page.after is not None and not page.after.isdigit():
        raise InvalidArgumentError(
            "page_token is malformed: pass the next_page_token of the previous response unchanged"
        )
    return page
