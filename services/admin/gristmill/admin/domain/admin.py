"""Organisations, plans and API keys: who may do what, and the rules of keys.

Callers are ``Principal``s (the auth hook has already checked the method's scope). Admins of the root
organisation (``root_organization_id``) manage every organisation; an admin of another organisation manages
only its own keys, and sees other organisations as if they did not exist (NOT_FOUND, never
PERMISSION_DENIED, so that ids cannot be probed). Only root admins create organisations and set plans.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path

from gristmill.admin.domain.model import ApiKey, CreatedKey, Organization
from gristmill.admin.domain.ports import AdminStore
from gristmill.core.auth import ADMIN, ApiKeyVerifier, MatchedKeys, Principal, api_key_id_of, new_api_key
from gristmill.core.auth import validate_scopes as _validate_scopes
from gristmill.core.auth_quota import Plan
from gristmill.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from gristmill.core.ids import validate_id
from gristmill.core.paging import fingerprint, next_page_token, page_request
from gristmill.core.values import utc_now

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
MAX_DISPLAY_NAME = 200
# A rotation's old key may keep working this long at most.
MAX_ROTATION_GRACE = timedelta(days=30)
# last_used_time is written at most this often per key (a write per call would be a write per request).
TOUCH_EVERY = timedelta(minutes=1)


def organization_not_found(organization_id: str) -> NotFoundError:
    """The one answer for an organisation that does not exist or that the caller may not see."""
    return NotFoundError(f"organization {organization_id!r} not found")


def key_not_found(api_key_id: str) -> NotFoundError:
    return NotFoundError(f"API key {api_key_id!r} not found")


def _display_name(value: str) -> str:
    if len(value) > MAX_DISPLAY_NAME:
        raise InvalidArgumentError(f"display_name must be at most {MAX_DISPLAY_NAME} characters (got {len(value)})")
    return value


class Admin:
    def __init__(self, store: AdminStore, *, root_organization_id: str, clock: Clock = utc_now) -> None:
        self.store = store
        self.root_organization_id = validate_id(root_organization_id, what="root organization id")
        self.clock = clock

    # -- who may do what -----------------------------------------------------------------------------------

    def is_root_admin(self, caller: Principal) -> bool:
        return caller.organization_id == self.root_organization_id and caller.has_scope(ADMIN)

    def visible_organization(self, caller: Principal, organization_id: str) -> str:
        """The organisation a request names (empty: the caller's), if the caller may see it, else NOT_FOUND."""
        org = validate_id(organization_id, what="organization_id") if organization_id else caller.organization_id
        if org != caller.organization_id and not self.is_root_admin(caller):
            raise organization_not_found(org)
        return org

    def existing_organization(self, caller: Principal, organization_id: str) -> Organization:
        org = self.visible_organization(caller, organization_id)
        found = self.store.get_organization(org)
        if found is None:
            raise organization_not_found(org)
        return found

    def _require_root_admin(self, caller: Principal, action: str) -> None:
        if not self.is_root_admin(caller):
            raise PermissionDeniedError(
                f"only admins of the root organization {self.root_organization_id!r} can {action}"
            )

    # -- organisations -------------------------------------------------------------------------------------

    def create_organization(
        self, caller: Principal, organization_id: str, display_name: str, plan: Plan
    ) -> Organization:
        self._require_root_admin(caller, "create organizations")
        org = Organization(
            validate_id(organization_id, what="organization_id"),
            _display_name(display_name),
            plan.validate(),
            self.clock(),
        )
        created = self.store.insert_organization(org)
        log.info("organization %s created by %s", org.organization_id, caller.actor)
        return created

    def get_organization(self, caller: Principal, organization_id: str) -> Organization:
        return self.existing_organization(caller, organization_id)

    def list_organizations(self, caller: Principal, page_size: int, page_token: str) -> tuple[list[Organization], str]:
        if not self.is_root_admin(caller):
            # Others see only their own organisation: one page of at most one.
            page_request(page_size, page_token, fingerprint("orgs", caller.organization_id))
            own = self.store.get_organization(caller.organization_id)
            return ([own] if own is not None and not page_token else []), ""
        query = fingerprint("orgs", "*")
        items, after = self.store.list_organizations(page_request(page_size, page_token, query))
        return items, next_page_token(after, query)

    def set_plan(self, caller: Principal, organization_id: str, plan: Plan) -> Organization:
        if not organization_id:
            raise InvalidArgumentError("organization_id is required")
        org = self.visible_organization(caller, organization_id)
        self._require_root_admin(caller, "set plans")
        plan = plan.validate()
        updated = self.store.set_plan(org, plan)
        if updated is None:
            raise organization_not_found(org)
        log.info("plan of organization %s set to %r by %s", org, plan.name, caller.actor)
        return updated

    # -- API keys ------------------------------------------------------------------------------------------

    def create_key(
        self,
        caller: Principal,
        organization_id: str,
        display_name: str,
        scopes: Iterable[str],
        expire_time: datetime | None,
    ) -> CreatedKey:
        org = self.existing_organization(caller, organization_id).organization_id
        valid_scopes = _validate_scopes(scopes)
        name = _display_name(display_name)
        now = self.clock()
        if expire_time is not None and expire_time <= now:
            raise InvalidArgumentError("expire_time is in the past: leave it out for a key that does not expire")
        created = self._insert(org, name, valid_scopes, expire_time, now, rotated_from="")
        log.info("API key %s created in %s by %s", created.key.api_key_id, org, caller.actor)
        return created

    def _insert(
        self,
        org: str,
        name: str,
        scopes: frozenset[str],
        expire_time: datetime | None,
        now: datetime,
        *,
        rotated_from: str,
        old_revoke_time: datetime | None = None,
    ) -> CreatedKey:
        issued = new_api_key()
        key = ApiKey(
            api_key_id=issued.api_key_id,
            organization_id=org,
            display_name=name,
            scopes=scopes,
            secret_prefix=issued.secret_prefix,
            create_time=now,
            expire_time=expire_time,
            rotated_from_api_key_id=rotated_from,
        )
        if rotated_from and old_revoke_time is not None:
            self.store.rotate_key(rotated_from, old_revoke_time, key, issued.secret_hash)
        else:
            self.store.insert_key(key, issued.secret_hash)
        return CreatedKey(key, issued.secret)

    def list_keys(
        self, caller: Principal, organization_id: str, include_revoked: bool, page_size: int, page_token: str
    ) -> tuple[list[ApiKey], str]:
        org = self.existing_organization(caller, organization_id).organization_id
        query = fingerprint("keys", [org, include_revoked])
        page = page_request(page_size, page_token, query)
        if page.after is not None and not page.after.isdigit():
            raise InvalidArgumentError("page_token is malformed: pass the next_page_token of the previous response")
        items, after = self.store.list_keys(
            org, include_revoked_before=None if include_revoked else self.clock(), page=page
        )
        return items, next_page_token(after, query)

    def _visible_key(self, caller: Principal, api_key_id: str) -> ApiKey:
        key_id = validate_id(api_key_id, what="api_key_id")
        stored = self.store.get_key(key_id)
        if stored is None or (stored.key.organization_id != caller.organization_id and not self.is_root_admin(caller)):
            raise key_not_found(key_id)
        return stored.key

    def rotate_key(self, caller: Principal, api_key_id: str, grace: timedelta) -> CreatedKey:
        if grace < timedelta(0) or grace > MAX_ROTATION_GRACE:
            raise InvalidArgumentError(
                f"grace_period must be between 0 and {MAX_ROTATION_GRACE.days} days (0: the old key stops at once)"
            )
        old = self._visible_key(caller, api_key_id)
        now = self.clock()
        if old.revoked_at(now):
            raise FailedPreconditionError(f"API key {old.api_key_id} is revoked: create a new key instead")
        if old.expire_time is not None and old.expire_time <= now:
            raise FailedPreconditionError(f"API key {old.api_key_id} has expired: create a new key instead")
        created = self._insert(
            old.organization_id,
            old.display_name,
            old.scopes,
            old.expire_time,
            now,
            rotated_from=old.api_key_id,
            old_revoke_time=now + grace,
        )
        log.info(
            "API key %s rotated to %s by %s (old key works for %ss)",
            old.api_key_id,
            created.key.api_key_id,
            caller.actor,
            int(grace.total_seconds()),
        )
        return created

    def revoke_key(self, caller: Principal, api_key_id: str) -> ApiKey:
        key = self._visible_key(caller, api_key_id)
        revoked = self.store.revoke_key(key.api_key_id, self.clock())
        if revoked is None:
            raise key_not_found(key.api_key_id)
        log.info("API key %s revoked by %s", key.api_key_id, caller.actor)
        return revoked

    # -- first start ---------------------------------------------------------------------------------------

    def bootstrap(self, key_file: Path) -> Path | None:
        """Make sure the root organisation exists; on the very first start also make its first admin key
        and write it to ``key_file`` (mode 0600). Returns the file when a key was written."""
        root = self.root_organization_id
        if self.store.get_organization(root) is None:
            with contextlib.suppress(AlreadyExistsError):  # another replica made it first
                self.store.insert_organization(Organization(root, "root organization", Plan(), self.clock()))
        if self.store.count_keys(root) > 0:
            return None
        created = self._insert(root, "bootstrap admin", frozenset({ADMIN}), None, self.clock(), rotated_from="")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL + 0600: never overwrite a file, never let another user read the secret.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(created.secret + "\n")
        log.warning(
            "first start: created admin key %s of the root organization %r; its secret is in %s (read it, store "
            "it safely, then delete the file)",
            created.key.api_key_id,
            root,
            key_file,
        )
        return key_file


class LocalKeyVerifier(ApiKeyVerifier):
    """Verifies keys against the admin store (the admin service's own auth hook uses it)."""

    def __init__(self, store: AdminStore, *, clock: Clock = utc_now) -> None:
        self.store = store
        self.clock = clock
        self._matched = MatchedKeys()

    def verify(self, api_key: str) -> Principal | None:
        key_id = api_key_id_of(api_key)
        stored = self.store.get_key(key_id) if key_id else None
        if stored is None or not self._matched.check(api_key, stored.secret_hash):
            return None
        now = self.clock()
        key = stored.key
        if not key.usable_at(now):
            return None
        if key.last_used_time is None or now - key.last_used_time >= TOUCH_EVERY:
            self.store.touch_key(key.api_key_id, now)
        return Principal(key.organization_id, key.api_key_id, key.scopes)
