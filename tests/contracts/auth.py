"""One auth conformance suite that every service runs against itself, over real gRPC.

A service's test module subclasses ``AuthContract`` and provides an async ``auth_subject`` fixture: a
running server with an ``ApiKeyAuthHook``, one call that needs a known scope, and a way to issue and revoke
keys that server accepts. Services whose objects belong to organisations also subclass ``CrossOrgContract``
with a ``cross_org_subject`` fixture. The statuses checked:

- UNAUTHENTICATED: no key, a malformed header, an unknown key, a revoked key;
- PERMISSION_DENIED: a valid key without the call's scope (``admin`` has every scope);
- NOT_FOUND: an object of another organisation, with the same message as a missing object;
- and, always, health stays open and no answer echoes a secret.

``InMemoryKeyVerifier`` is a key store in a dict (hashed like the real one) for subjects that have none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.core.auth import (
    ADMIN,
    ApiKeyAuthHook,
    ApiKeyVerifier,
    Principal,
    api_key_id_of,
    check_api_key,
    new_api_key,
)
from gristmill.core.license_service import LICENSE_METHOD_SCOPES
from gristmill.core.licensing import License, load_license
from gristmill.core.security import Security

Metadata = Sequence[tuple[str, str]]
Call = Callable[[grpc.aio.Channel, Metadata], Awaitable[object]]


def bearer(secret: str) -> Metadata:
    return (("authorization", f"Bearer {secret}"),)


class InMemoryKeyVerifier(ApiKeyVerifier):
    """Keys kept in memory, stored hashed and checked like the admin service's store."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, Principal]] = {}
        self._revoked: set[str] = set()

    def issue(self, organization_id: str, scopes: set[str] | frozenset[str]) -> str:
        key = new_api_key()
        self._keys[key.api_key_id] = (key.secret_hash, Principal(organization_id, key.api_key_id, frozenset(scopes)))
        return key.secret

    def revoke(self, secret: str) -> None:
        key_id = api_key_id_of(secret)
        assert key_id is not None
        self._revoked.add(key_id)

    def verify(self, api_key: str) -> Principal | None:
        key_id = api_key_id_of(api_key)
        found = self._keys.get(key_id or "")
        if found is None or key_id in self._revoked or not check_api_key(api_key, found[0]):
            return None
        return found[1]


@dataclass
class AuthSubject:
    """A running server under test."""

    address: str
    # One call and the scope it needs; ``other_scope`` neither is nor implies it.
    call: Call
    scope: str
    other_scope: str
    organization_id: str
    issue_key: Callable[[str, frozenset[str]], Awaitable[str]]
    # Revoking must take effect for the next call (a subject with a caching verifier uses a TTL of 0).
    revoke_key: Callable[[str], Awaitable[None]]


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


class AuthContract:
    async def test_missing_key_is_unauthenticated(self, auth_subject: AuthSubject) -> None:
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            err = await _refused(auth_subject.call(channel, ()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (err.details() or "")

    @pytest.mark.parametrize(
        "header",
        ["Basic dXNlcjpwYXNzd29yZA==", "Bearer", "Bearer not-a-gristmill-key", "gmk_0123456789abcdef_" + "x" * 43],
    )
    async def test_malformed_header_is_unauthenticated(self, auth_subject: AuthSubject, header: str) -> None:
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            err = await _refused(auth_subject.call(channel, (("authorization", header),)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not-a-gristmill-key" not in (err.details() or "") and "x" * 43 not in (err.details() or "")

    async def test_unknown_key_is_unauthenticated(self, auth_subject: AuthSubject) -> None:
        forged = new_api_key().secret
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            err = await _refused(auth_subject.call(channel, bearer(forged)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "unknown, expired or revoked" in (err.details() or "")
        assert forged not in (err.details() or "")

    async def test_revoked_key_is_unauthenticated(self, auth_subject: AuthSubject) -> None:
        secret = await auth_subject.issue_key(auth_subject.organization_id, frozenset({auth_subject.scope}))
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            await auth_subject.call(channel, bearer(secret))
            await auth_subject.revoke_key(secret)
            err = await _refused(auth_subject.call(channel, bearer(secret)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert secret not in (err.details() or "")

    async def test_key_without_the_scope_is_permission_denied(self, auth_subject: AuthSubject) -> None:
        secret = await auth_subject.issue_key(auth_subject.organization_id, frozenset({auth_subject.other_scope}))
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            err = await _refused(auth_subject.call(channel, bearer(secret)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert auth_subject.scope in (err.details() or "")
        assert secret not in (err.details() or "")

    async def test_key_with_the_scope_or_admin_is_let_through(self, auth_subject: AuthSubject) -> None:
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            for scopes in ({auth_subject.scope}, {ADMIN}):
                secret = await auth_subject.issue_key(auth_subject.organization_id, frozenset(scopes))
                await auth_subject.call(channel, bearer(secret))

    async def test_health_needs_no_key(self, auth_subject: AuthSubject) -> None:
        async with grpc.aio.insecure_channel(auth_subject.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class CrossOrgSubject:
    """A running server holding an object named ``owned_name`` of ``owner_org``."""

    address: str
    owner_org: str
    other_org: str
    # Reads the object called ``name`` (with the given metadata).
    read: Callable[[grpc.aio.Channel, Metadata, str], Awaitable[object]]
    owned_name: str
    # A name that exists in no organisation.
    missing_name: str
    # A key of an organisation with enough scope for the read.
    issue_key: Callable[[str], Awaitable[str]]


class CrossOrgContract:
    async def test_owner_reads_its_object(self, cross_org_subject: CrossOrgSubject) -> None:
        subject = cross_org_subject
        secret = await subject.issue_key(subject.owner_org)
        async with grpc.aio.insecure_channel(subject.address) as channel:
            await subject.read(channel, bearer(secret), subject.owned_name)

    async def test_other_organisation_gets_not_found_like_a_missing_object(
        self, cross_org_subject: CrossOrgSubject
    ) -> None:
        subject = cross_org_subject
        secret = await subject.issue_key(subject.other_org)
        async with grpc.aio.insecure_channel(subject.address) as channel:
            foreign = await _refused(subject.read(channel, bearer(secret), subject.owned_name))
            missing = await _refused(subject.read(channel, bearer(secret), subject.missing_name))
        assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        # Word for word the same answer (up to the name asked for): nothing tells "exists elsewhere" apart.
        assert (foreign.details() or "").replace(subject.owned_name, "<name>") == (missing.details() or "").replace(
            subject.missing_name, "<name>"
        )


def api_key_security(
    keys: ApiKeyVerifier,
    method_scopes: Mapping[str, str],
    *,
    public: Collection[str] = (),
    license_: License | None = None,
) -> Security:
    """A service's ``Security`` with API keys checked by ``keys`` against its own scope table (and the
    ``LicenseService``'s), as ``load_security`` builds it in a real process."""
    hook = ApiKeyAuthHook(keys, {**method_scopes, **LICENSE_METHOD_SCOPES}, public=public)
    return Security(hook, license_ or load_license(None, ""))


class ScopeTableContract:
    """Every RPC of the service's gRPC services has a scope in its table (nothing is refused by accident, and
    nothing added later is open by accident: the hook refuses a method it has no scope for)."""

    def test_every_rpc_has_a_scope(self, scope_table: tuple[Sequence[ServiceDescriptor], Mapping[str, str]]) -> None:
        services, table = scope_table
        hook = ApiKeyAuthHook(InMemoryKeyVerifier(), table)
        missing = [
            f"/{service.full_name}/{method.name}"
            for service in services
            for method in service.methods
            if hook.scope_for(f"/{service.full_name}/{method.name}") is None
        ]
        assert not missing, f"RPCs without a scope: {missing}"


def key_subject(
    address: str, keys: InMemoryKeyVerifier, call: Call, scope: str, other_scope: str, organization_id: str = "acme"
) -> AuthSubject:
    """An ``AuthSubject`` for a server whose keys live in ``keys`` (revoking takes effect at once)."""

    async def issue(org: str, scopes: frozenset[str]) -> str:
        return keys.issue(org, scopes)

    async def revoke(secret: str) -> None:
        keys.revoke(secret)

    return AuthSubject(address, call, scope, other_scope, organization_id, issue, revoke)


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error a call answers with (it must fail)."""
    return await _refused(call)
