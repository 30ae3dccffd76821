"""Registered models and their versions: create, read, search, edit, resolve for download.

Every method takes the ``Caller`` (organisation and actor) and validated or validatable plain values, and
works through one store transaction, so a refused request changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

from gristmill.core import paging
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.licensing import License
from gristmill.registry.domain import names
from gristmill.registry.domain.common import check_mask, check_model_limit, numeric_page, require_model, resolve_version
from gristmill.registry.domain.model import (
    Caller,
    ModelQuery,
    ModelVersion,
    RegisteredModel,
    VersionQuery,
    VersionStatus,
)
from gristmill.registry.domain.ports import RegistryStore

_PREFIX_CHARS = re.compile(r"^[a-z0-9._-]{0,128}$")


class ModelCatalog:
    """The models + versions aggregate (registration of new versions is ``Registrations``)."""

    def __init__(self, store: RegistryStore, *, clock: Callable[[], datetime], license_: License) -> None:
        self.store = store
        self.clock = clock
        # Enterprise licence limits (max_registered_models); the community edition's without one.
        self.license = license_

    # ------------------------------------------------------------------------------------ registered models

    def create_model(
        self,
        caller: Caller,
        *,
        name: str,
        description: str,
        task: str,
        label_map: tuple[str, ...],
        tags: dict[str, str],
    ) -> RegisteredModel:
        names.validate_model_name(name)
        names.validate_text(description, what="description")
        names.validate_task(task)
        names.validate_label_map(label_map)
        names.validate_tags(tags)
        with self.store.transaction() as tx:
            check_model_limit(tx, self.license)
            return tx.insert_model(
                caller.organization_id,
                name,
                description=description,
                task=task,
                label_map=label_map,
                tags=tags,
                created_by=caller.actor,
                now=self.clock(),
            )

    def get_model(self, caller: Caller, name: str) -> RegisteredModel:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            return require_model(tx, caller.organization_id, name)

    def search_models(
        self, caller: Caller, query: ModelQuery, page_size: int, page_token: str
    ) -> tuple[list[RegisteredModel], str]:
        if not _PREFIX_CHARS.fullmatch(query.name_prefix):
            raise InvalidArgumentError(
                f"name_prefix {query.name_prefix[:64]!r} can never match: model names use only lower-case letters, "
                "digits, '.', '-' and '_'"
            )
        if query.has_alias:
            names.validate_alias(query.has_alias)
        names.validate_task(query.task or names.TASK_UNSPECIFIED)
        names.validate_tags(query.tags)
        fingerprint = paging.fingerprint(
            "models", [query.name_prefix, sorted(query.tags.items()), query.has_alias, query.task]
        )
        page = paging.page_request(page_size, page_token, fingerprint)
        with self.store.transaction() as tx:
            items, after = tx.search_models(caller.organization_id, query, page)
        return items, paging.next_page_token(after, fingerprint)

    def update_model(
        self,
        caller: Caller,
        name: str,
        paths: list[str],
        *,
        description: str,
        tags: dict[str, str],
        label_map: tuple[str, ...],
    ) -> RegisteredModel:
        names.validate_model_name(name)
        check_mask(paths, ("description", "tags", "label_map"), what="registered model")
        if "description" in paths:
            names.validate_text(description, what="description")
        if "tags" in paths:
            names.validate_tags(tags)
        if "label_map" in paths:
            names.validate_label_map(label_map)
        with self.store.transaction() as tx:
            require_model(tx, caller.organization_id, name)
            return tx.update_model(
                caller.organization_id,
                name,
                now=self.clock(),
                description=description if "description" in paths else None,
                tags=tags if "tags" in paths else None,
                label_map=label_map if "label_map" in paths else None,
            )

    # ------------------------------------------------------------------------------------ versions

    def get_version(self, caller: Caller, name: str, *, version: int | None, alias: str | None) -> ModelVersion:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            return resolve_version(tx, caller.organization_id, name, version=version, alias=alias)

    def list_versions(
        self, caller: Caller, name: str, query: VersionQuery, page_size: int, page_token: str
    ) -> tuple[list[ModelVersion], str]:
        names.validate_model_name(name)
        if query.alias:
            names.validate_alias(query.alias)
        names.validate_tags(query.tags)
        for f in query.metric_filters:
            if not f.metric_name:
                raise InvalidArgumentError("metric filter needs a metric_name")
        fingerprint = paging.fingerprint(
            "versions",
            [
                name,
                sorted(s.value for s in query.statuses),
                sorted(query.tags.items()),
                query.alias,
                [(f.metric_name, f.split, f.comparison.value, f.value) for f in query.metric_filters],
            ],
        )
        page = numeric_page(paging.page_request(page_size, page_token, fingerprint))
        with self.store.transaction() as tx:
            require_model(tx, caller.organization_id, name)
            items, after = tx.list_versions(caller.organization_id, name, query, page)
        return items, paging.next_page_token(after, fingerprint)

    def update_version(
        self, caller: Caller, name: str, version: int, paths: list[str], *, description: str, tags: dict[str, str]
    ) -> ModelVersion:
        names.validate_model_name(name)
        names.validate_version_number(version)
        check_mask(paths, ("description", "tags"), what="model version")
        if "description" in paths:
            names.validate_text(description, what="description")
        if "tags" in paths:
            names.validate_tags(tags)
        with self.store.transaction() as tx:
            resolve_version(tx, caller.organization_id, name, version=version, alias=None)
            return tx.update_version(
                caller.organization_id,
                name,
                version,
                now=self.clock(),
                description=description if "description" in paths else None,
                tags=tags if "tags" in paths else None,
            )

    # ------------------------------------------------------------------------------------ download manifest

    def download_manifest(self, caller: Caller, name: str, *, version: int | None, alias: str | None) -> ModelVersion:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            found = resolve_version(tx, caller.organization_id, name, version=version, alias=alias)
        if found.status is not VersionStatus.READY:
            why = f": {found.status_reason}" if found.status_reason else ""
            raise FailedPreconditionError(
                f"version {found.version} of {name!r} is {found.status.value}{why}; only READY versions can be loaded"
            )
        return found
