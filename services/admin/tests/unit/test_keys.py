"""Organisations and API keys in the domain: shown once, stored hashed, rotated, revoked, scoped to an org."""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from gristmill.admin.domain.admin import TOUCH_EVERY, Admin
from gristmill.core.auth import ADMIN, REGISTRY_READ, SERVING_PREDICT, Principal, api_key_id_of
from gristmill.core.auth_quota import Plan, Quota, QuotaPeriod, RateLimit, UsageKind
from gristmill.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from services.admin.tests.support import ROOT, ROOT_ADMIN, Env

PLAN = Plan("team", (Quota(UsageKind.PREDICTIONS, QuotaPeriod.DAY, 100),), RateLimit(5, 10))


def _acme_admin(env: Env) -> Principal:
    env.admin.create_organization(ROOT_ADMIN, "acme", "Acme", PLAN)
    created = env.admin.create_key(ROOT_ADMIN, "acme", "acme admin", [ADMIN], None)
    principal = env.verifier.verify(created.secret)
    assert principal is not None
    return principal


def test_first_start_makes_the_root_org_and_one_admin_key_in_a_private_file(env: Env, tmp_path: Path) -> None:
    key_file = tmp_path / "root.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    principal = env.verifier.verify(key_file.read_text().strip())
    assert principal is not None and (principal.organization_id, principal.scopes) == (ROOT, {ADMIN})
    # A second start writes nothing (keys exist already).
    again = Admin(env.store, root_organization_id=ROOT, clock=env.clock)
    assert again.bootstrap(tmp_path / "other.key") is None
    assert not (tmp_path / "other.key").exists()


def test_a_key_is_shown_once_and_stored_only_as_a_hash(env: Env) -> None:
    created = env.admin.create_key(ROOT_ADMIN, "", "ci", [REGISTRY_READ], None)
    assert created.key.organization_id == ROOT
    assert api_key_id_of(created.secret) == created.key.api_key_id
    assert created.key.secret_prefix == created.secret[:12]
    with env.database.engine.connect() as connection:
        dump = "\n".join(str(row) for row in connection.execute(text("SELECT * FROM admin_api_keys")))
    assert created.key.api_key_id in dump
    assert created.secret not in dump and created.secret.split("_", 2)[2] not in dump
    listed, _ = env.admin.list_keys(ROOT_ADMIN, "", False, 0, "")
    assert created.key in listed


def test_key_requests_are_validated(env: Env) -> None:
    with pytest.raises(InvalidArgumentError, match="at least one scope"):
        env.admin.create_key(ROOT_ADMIN, "", "x", [], None)
    with pytest.raises(InvalidArgumentError, match="unknown scope 'root'"):
        env.admin.create_key(ROOT_ADMIN, "", "x", ["root"], None)
    with pytest.raises(InvalidArgumentError, match="expire_time is in the past"):
        env.admin.create_key(ROOT_ADMIN, "", "x", [ADMIN], env.clock.now - timedelta(seconds=1))
    with pytest.raises(InvalidArgumentError, match="display_name"):
        env.admin.create_key(ROOT_ADMIN, "", "x" * 201, [ADMIN], None)
    with pytest.raises(NotFoundError, match="organization 'ghost' not found"):
        env.admin.create_key(ROOT_ADMIN, "ghost", "x", [ADMIN], None)
    with pytest.raises(InvalidArgumentError, match="organization_id"):
        env.admin.create_key(ROOT_ADMIN, "Bad Org", "x", [ADMIN], None)
    listed, _ = env.admin.list_keys(ROOT_ADMIN, "", True, 0, "")
    assert len(listed) == 1, "only the bootstrap key: nothing was written by the refused requests"


def test_expired_keys_stop_working(env: Env) -> None:
    created = env.admin.create_key(ROOT_ADMIN, "", "x", [ADMIN], env.clock.now + timedelta(hours=1))
    assert env.verifier.verify(created.secret) is not None
    env.clock.advance(hours=1)
    assert env.verifier.verify(created.secret) is None


def test_rotation_keeps_the_old_key_for_the_grace_period_only(env: Env) -> None:
    old = env.admin.create_key(ROOT_ADMIN, "", "deploy", [SERVING_PREDICT], None)
    new = env.admin.rotate_key(ROOT_ADMIN, old.key.api_key_id, timedelta(minutes=10))
    assert new.key.rotated_from_api_key_id == old.key.api_key_id
    assert (new.key.scopes, new.key.organization_id, new.key.display_name) == ({SERVING_PREDICT}, ROOT, "deploy")
    assert new.secret != old.secret
    assert env.verifier.verify(old.secret) is not None and env.verifier.verify(new.secret) is not None
    env.clock.advance(minutes=10)
    assert env.verifier.verify(old.secret) is None
    assert env.verifier.verify(new.secret) is not None
    with pytest.raises(FailedPreconditionError, match="is revoked: create a new key"):
        env.admin.rotate_key(ROOT_ADMIN, old.key.api_key_id, timedelta(0))
    with pytest.raises(InvalidArgumentError, match="grace_period"):
        env.admin.rotate_key(ROOT_ADMIN, new.key.api_key_id, timedelta(days=31))
    with pytest.raises(InvalidArgumentError, match="grace_period"):
        env.admin.rotate_key(ROOT_ADMIN, new.key.api_key_id, timedelta(seconds=-1))


def test_rotation_without_grace_revokes_at_once(env: Env) -> None:
    old = env.admin.create_key(ROOT_ADMIN, "", "deploy", [SERVING_PREDICT], None)
    assert env.verifier.verify(old.secret) is not None  # the verifier now remembers the key's match
    env.admin.rotate_key(ROOT_ADMIN, old.key.api_key_id, timedelta(0))
    assert env.verifier.verify(old.secret) is None


def test_revoke_is_immediate_and_idempotent(env: Env) -> None:
    created = env.admin.create_key(ROOT_ADMIN, "", "x", [ADMIN], None)
    assert env.verifier.verify(created.secret) is not None  # the verifier now remembers the key's match
    first = env.admin.revoke_key(ROOT_ADMIN, created.key.api_key_id)
    assert first.revoke_time == env.clock.now
    assert env.verifier.verify(created.secret) is None
    env.clock.advance(minutes=5)
    again = env.admin.revoke_key(ROOT_ADMIN, created.key.api_key_id)
    assert again == first, "revoking a revoked key returns it unchanged"
    active, _ = env.admin.list_keys(ROOT_ADMIN, "", False, 0, "")
    everything, _ = env.admin.list_keys(ROOT_ADMIN, "", True, 0, "")
    assert created.key.api_key_id not in {k.api_key_id for k in active}
    assert created.key.api_key_id in {k.api_key_id for k in everything}
    with pytest.raises(NotFoundError, match="API key '0123456789abcdef' not found"):
        env.admin.revoke_key(ROOT_ADMIN, "0123456789abcdef")
    with pytest.raises(InvalidArgumentError, match="api_key_id"):
        env.admin.revoke_key(ROOT_ADMIN, "../x")


def test_keys_are_listed_newest_first_across_pages(env: Env) -> None:
    ids = [env.admin.create_key(ROOT_ADMIN, "", f"k{i}", [ADMIN], None).key.api_key_id for i in range(5)]
    pages: list[str] = []
    token = ""
    while True:
        items, token = env.admin.list_keys(ROOT_ADMIN, "", False, 2, token)
        pages.extend(k.api_key_id for k in items)
        if not token:
            break
    assert pages[:5] == list(reversed(ids))
    assert len(pages) == 6  # and the bootstrap key last
    with pytest.raises(InvalidArgumentError, match="different query"):
        env.admin.list_keys(ROOT_ADMIN, "", True, 2, env.admin.list_keys(ROOT_ADMIN, "", False, 2, "")[1])
    with pytest.raises(InvalidArgumentError, match="malformed"):
        env.admin.list_keys(ROOT_ADMIN, "", False, 2, "not-a-token")
    with pytest.raises(InvalidArgumentError, match="page_size"):
        env.admin.list_keys(ROOT_ADMIN, "", False, -1, "")


def test_another_organisation_is_invisible_to_a_non_root_admin(env: Env) -> None:
    acme = _acme_admin(env)
    env.admin.create_organization(ROOT_ADMIN, "globex", "Globex", Plan())
    globex_key = env.admin.create_key(ROOT_ADMIN, "globex", "g", [ADMIN], None)
    missing = "organization 'nowhere' not found"
    for org, message in (("globex", "organization 'globex' not found"), ("nowhere", missing)):
        with pytest.raises(NotFoundError) as err:
            env.admin.get_organization(acme, org)
        assert err.value.message == message
        with pytest.raises(NotFoundError):
            env.admin.create_key(acme, org, "x", [ADMIN], None)
        with pytest.raises(NotFoundError):
            env.admin.list_keys(acme, org, False, 0, "")
    for call in (env.admin.revoke_key, lambda c, k: env.admin.rotate_key(c, k, timedelta(0))):
        with pytest.raises(NotFoundError, match=f"API key '{globex_key.key.api_key_id}' not found"):
            call(acme, globex_key.key.api_key_id)
    assert env.verifier.verify(globex_key.secret) is not None, "the refused calls changed nothing"
    # Their own organisation and keys they manage.
    assert env.admin.get_organization(acme, "").organization_id == "acme"
    mine = env.admin.create_key(acme, "", "mine", [REGISTRY_READ], None)
    assert mine.key.organization_id == "acme"
    orgs, _ = env.admin.list_organizations(acme, 0, "")
    assert [o.organization_id for o in orgs] == ["acme"]


def test_only_root_admins_create_organisations_and_set_plans(env: Env) -> None:
    acme = _acme_admin(env)
    with pytest.raises(PermissionDeniedError, match="only admins of the root organization 'root'"):
        env.admin.create_organization(acme, "initech", "", Plan())
    with pytest.raises(PermissionDeniedError, match="set plans"):
        env.admin.set_plan(acme, "acme", Plan("free"))
    with pytest.raises(NotFoundError):
        env.admin.get_organization(ROOT_ADMIN, "initech")
    assert env.admin.get_organization(ROOT_ADMIN, "acme").plan == PLAN
    updated = env.admin.set_plan(ROOT_ADMIN, "acme", Plan("free"))
    assert updated.plan == Plan("free")
    orgs, _ = env.admin.list_organizations(ROOT_ADMIN, 0, "")
    assert [o.organization_id for o in orgs] == ["acme", ROOT]


def test_organisation_requests_are_validated(env: Env) -> None:
    env.admin.create_organization(ROOT_ADMIN, "acme", "Acme", Plan())
    with pytest.raises(AlreadyExistsError, match="'acme' already exists"):
        env.admin.create_organization(ROOT_ADMIN, "acme", "Again", Plan())
    bad_plans = [
        (Plan("p", (Quota(UsageKind.PREDICTIONS, QuotaPeriod.DAY, -1),)), "zero or more"),
        (
            Plan(
                "p",
                (Quota(UsageKind.PREDICTIONS, QuotaPeriod.DAY, 1), Quota(UsageKind.PREDICTIONS, QuotaPeriod.DAY, 2)),
            ),
            "two quotas",
        ),
        (Plan("p", (), RateLimit(0)), "requests_per_second above 0"),
    ]
    for plan, message in bad_plans:
        with pytest.raises(InvalidArgumentError, match=message):
            env.admin.create_organization(ROOT_ADMIN, "initech", "", plan)
        with pytest.raises(InvalidArgumentError, match=message):
            env.admin.set_plan(ROOT_ADMIN, "acme", plan)
    with pytest.raises(InvalidArgumentError, match="organization_id"):
        env.admin.create_organization(ROOT_ADMIN, "", "", Plan())
    with pytest.raises(InvalidArgumentError, match="organization_id is required"):
        env.admin.set_plan(ROOT_ADMIN, "", Plan())
    with pytest.raises(NotFoundError):
        env.admin.set_plan(ROOT_ADMIN, "initech", Plan())
    assert env.store.get_organization("initech") is None
    assert env.admin.get_organization(ROOT_ADMIN, "acme").plan == Plan()


def test_last_use_is_recorded_at_most_once_a_minute(env: Env) -> None:
    created = env.admin.create_key(ROOT_ADMIN, "", "x", [ADMIN], None)
    env.verifier.verify(created.secret)
    first = env.store.get_key(created.key.api_key_id)
    assert first is not None and first.key.last_used_time == env.clock.now
    env.clock.advance(seconds=30)
    env.verifier.verify(created.secret)
    second = env.store.get_key(created.key.api_key_id)
    assert second is not None and second.key.last_used_time == first.key.last_used_time
    env.clock.advance(seconds=TOUCH_EVERY.total_seconds())
    env.verifier.verify(created.secret)
    third = env.store.get_key(created.key.api_key_id)
    assert third is not None and third.key.last_used_time == env.clock.now


def test_a_forged_or_wrong_secret_for_a_real_key_id_is_refused(env: Env) -> None:
    created = env.admin.create_key(ROOT_ADMIN, "", "x", [ADMIN], None)
    prefix, key_id, _secret = created.secret.split("_", 2)
    forged = f"{prefix}_{key_id}_{'A' * 43}"
    assert env.verifier.verify(forged) is None
    assert env.verifier.verify(created.secret) is not None
