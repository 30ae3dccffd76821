"""API keys (shown once, stored hashed), scopes, the auth hook's answers, the dev-mode switch, the org check."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from gristmill.core import auth
from gristmill.core.auth import (
    ADMIN,
    AUTHENTICATED,
    DEV_PRINCIPAL,
    REGISTRY_PROMOTE,
    REGISTRY_READ,
    SERVING_PREDICT,
    ApiKeyAuthHook,
    AuthSettings,
    DisabledAuthHook,
    MatchedKeys,
    Principal,
    api_key_id_of,
    bearer_api_key,
    check_api_key,
    hash_api_key,
    new_api_key,
    organization_or_default,
    require_same_org,
    validate_scopes,
)
from gristmill.core.auth_remote import TtlCache
from gristmill.core.errors import (
    ConfigurationError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from gristmill.core.grpcserver import NOT_INLINE
from gristmill.core.security import build_auth_hook
from tests.contracts.auth import InMemoryKeyVerifier

SVC = "/gristmill.api.registry.v1.RegistryService"


def test_a_new_key_is_stored_only_as_a_salted_hash() -> None:
    key = new_api_key()
    assert key.secret.startswith(f"gmk_{key.api_key_id}_")
    assert api_key_id_of(key.secret) == key.api_key_id
    secret_part = key.secret.split("_", 2)[2]
    assert secret_part not in key.secret_hash and key.secret not in key.secret_hash
    assert key.secret not in repr(key), "the secret must not show in a repr (logs, tracebacks)"
    assert key.secret_prefix == key.secret[:12] and len(key.secret_prefix) < len(key.secret) // 4
    assert check_api_key(key.secret, key.secret_hash)
    # Another hash of the same key uses another salt, and still verifies.
    again = hash_api_key(key.secret)
    assert again != key.secret_hash and check_api_key(key.secret, again)


def test_a_wrong_or_damaged_key_does_not_verify() -> None:
    key, other = new_api_key(), new_api_key()
    assert not check_api_key(other.secret, key.secret_hash)
    assert not check_api_key(key.secret[:-1] + ("A" if key.secret[-1] != "A" else "B"), key.secret_hash)
    assert not check_api_key(key.secret, "md5$1$xx$yy")
    assert not check_api_key(key.secret, "garbage")


def test_matched_keys_answer_as_the_full_check_and_skip_it_for_a_known_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    key, other = new_api_key(), new_api_key()
    rehashed = hash_api_key(key.secret)  # the same key's secret stored again (another salt)
    matched = MatchedKeys(max_entries=2)
    full_checks: list[str] = []
    real = auth.check_api_key

    def counting(api_key: str, stored_hash: str) -> bool:
        full_checks.append(stored_hash)
        return real(api_key, stored_hash)

    monkeypatch.setattr(auth, "check_api_key", counting)
    assert matched.check(key.secret, key.secret_hash)
    assert matched.check(key.secret, key.secret_hash)
    assert full_checks == [key.secret_hash], "a pair that matched is not checked with PBKDF2 again"
    # A wrong key, or the right key against another stored hash, is checked in full every time.
    assert not matched.check(other.secret, key.secret_hash)
    assert not matched.check(other.secret, key.secret_hash)
    assert not matched.check(key.secret, other.secret_hash)
    assert matched.check(key.secret, rehashed)
    assert full_checks == [key.secret_hash, key.secret_hash, key.secret_hash, other.secret_hash, rehashed]
    # Bounded: the least recently used pair is forgotten (then checked in full again).
    assert matched.check(other.secret, other.secret_hash)
    third = new_api_key()
    assert matched.check(third.secret, third.secret_hash)
    full_checks.clear()
    assert matched.check(key.secret, rehashed)
    assert full_checks == [rehashed]


@pytest.mark.parametrize(
    "text", ["", "gmk_", "gmk_0123456789abcdef_short", "sk_0123456789abcdef_" + "a" * 43, "gmk_XYZ_" + "a" * 43]
)
def test_texts_that_are_not_keys_have_no_key_id(text: str) -> None:
    assert api_key_id_of(text) is None


def test_scopes_are_validated() -> None:
    assert validate_scopes([REGISTRY_READ, ADMIN]) == {REGISTRY_READ, ADMIN}
    with pytest.raises(InvalidArgumentError, match="at least one scope"):
        validate_scopes([])
    with pytest.raises(InvalidArgumentError, match="unknown scope 'registry:delete'.*choose from"):
        validate_scopes(["registry:delete"])


def test_admin_implies_every_scope_and_authenticated_needs_none() -> None:
    admin = Principal("acme", "k1", frozenset({ADMIN}))
    reader = Principal("acme", "k2", frozenset({REGISTRY_READ}))
    assert admin.has_scope(REGISTRY_PROMOTE) and admin.has_scope(SERVING_PREDICT)
    assert reader.has_scope(REGISTRY_READ) and not reader.has_scope(REGISTRY_PROMOTE)
    assert reader.has_scope(AUTHENTICATED)


def test_empty_organisation_means_default_and_bad_ids_are_refused() -> None:
    assert organization_or_default("") == "default"
    assert organization_or_default("acme") == "acme"
    with pytest.raises(InvalidArgumentError, match="organization_id"):
        organization_or_default("../etc")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing API key"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "expected 'Bearer <api key>'"),
        ((("authorization", "Bearer"),), "expected 'Bearer <api key>'"),
        ((("authorization", "Bearer not-a-gristmill-key"),), "malformed API key"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "exactly one"),
    ],
)
def test_missing_or_malformed_authorization_is_unauthenticated(
    metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    with pytest.raises(UnauthenticatedError, match=message) as err:
        bearer_api_key(metadata)
    assert "not-a-gristmill-key" not in err.value.message, "the presented credential must never be echoed"


@pytest.fixture
def keys() -> Iterator[InMemoryKeyVerifier]:
    yield InMemoryKeyVerifier()


def _hook(keys: InMemoryKeyVerifier) -> ApiKeyAuthHook:
    return ApiKeyAuthHook(
        keys,
        {f"{SVC}/*": REGISTRY_READ, f"{SVC}/SetAlias": REGISTRY_PROMOTE, f"{SVC}/WhoAmI": AUTHENTICATED},
        public={f"{SVC}/Public"},
    )


def _auth(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


def test_hook_returns_the_principal_of_a_key_with_the_scope(keys: InMemoryKeyVerifier) -> None:
    secret = keys.issue("acme", {REGISTRY_READ})
    principal = _hook(keys)(f"{SVC}/GetRegisteredModel", _auth(secret))
    assert principal is not None
    assert (principal.organization_id, principal.scopes) == ("acme", {REGISTRY_READ})
    assert principal.api_key_id == api_key_id_of(secret)
    # The exact method's scope wins over the service's.
    with pytest.raises(PermissionDeniedError, match="lacks scope 'registry:promote', which SetAlias needs"):
        _hook(keys)(f"{SVC}/SetAlias", _auth(secret))
    admin = keys.issue("acme", {ADMIN})
    assert _hook(keys)(f"{SVC}/SetAlias", _auth(admin)) is not None
    # AUTHENTICATED: any valid key; public: no key at all.
    assert _hook(keys)(f"{SVC}/WhoAmI", _auth(keys.issue("acme", {SERVING_PREDICT}))) is not None
    assert _hook(keys)(f"{SVC}/Public", ()) is None


def test_unknown_and_revoked_keys_are_unauthenticated(keys: InMemoryKeyVerifier) -> None:
    unknown = new_api_key().secret
    with pytest.raises(UnauthenticatedError, match="unknown, expired or revoked") as err:
        _hook(keys)(f"{SVC}/GetRegisteredModel", _auth(unknown))
    assert unknown not in err.value.message
    secret = keys.issue("acme", {REGISTRY_READ})
    keys.revoke(secret)
    with pytest.raises(UnauthenticatedError, match="unknown, expired or revoked"):
        _hook(keys)(f"{SVC}/GetRegisteredModel", _auth(secret))


def test_a_method_without_a_scope_is_closed(keys: InMemoryKeyVerifier) -> None:
    admin = keys.issue("acme", {ADMIN})
    with pytest.raises(PermissionDeniedError, match="not open to API keys"):
        _hook(keys)("/gristmill.api.other.v1.Other/Anything", _auth(admin))


def test_unknown_scopes_in_the_method_table_fail_at_start(keys: InMemoryKeyVerifier) -> None:
    with pytest.raises(ConfigurationError, match="unknown scopes"):
        ApiKeyAuthHook(keys, {f"{SVC}/*": "registry:everything"})


def test_auth_can_be_disabled_only_in_embedded_mode_and_says_so(
    keys: InMemoryKeyVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    settings = AuthSettings(disabled=True)
    with pytest.raises(ConfigurationError, match="only in the embedded dev mode"):
        build_auth_hook(settings, method_scopes={}, embedded=False)
    with caplog.at_level(logging.WARNING, logger="gristmill.core.auth"):
        hook = build_auth_hook(settings, method_scopes={}, embedded=True, service="registry")
    assert isinstance(hook, DisabledAuthHook)
    assert hook(f"{SVC}/SetAlias", ()) is DEV_PRINCIPAL
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "AUTH IS DISABLED for registry" in warnings[0].getMessage()


def test_auth_on_needs_a_verifier_or_the_admin_address(keys: InMemoryKeyVerifier) -> None:
    with pytest.raises(ConfigurationError, match="GRISTMILL_AUTH_ADMIN_ADDRESS"):
        build_auth_hook(AuthSettings(admin_address=""), method_scopes={}, embedded=True)
    hook = build_auth_hook(AuthSettings(), method_scopes={f"{SVC}/*": REGISTRY_READ}, embedded=False, verifier=keys)
    assert isinstance(hook, ApiKeyAuthHook)


def test_objects_of_another_organisation_are_not_found() -> None:
    caller = Principal("acme", "k1", frozenset({ADMIN}))
    require_same_org("acme", "model 'm' not found", caller)
    with pytest.raises(NotFoundError) as err:
        require_same_org("globex", "model 'm' not found", caller)
    assert err.value.message == "model 'm' not found", "the message must be the plain not-found one"
    default_caller = Principal("default", "k2", frozenset({ADMIN}))
    require_same_org("", "x", default_caller)


def test_current_principal_outside_a_call_fails_closed() -> None:
    from gristmill.core.auth import current_principal, optional_principal

    assert optional_principal() is None
    with pytest.raises(UnauthenticatedError):
        current_principal()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache_expires_entries_and_stays_bounded() -> None:
    clock = FakeClock()
    cache: TtlCache[str] = TtlCache(10, max_entries=2, clock=clock)
    cache.put(b"a", "A")
    assert cache.get(b"a") == (True, "A")
    clock.now += 10
    assert cache.get(b"a") == (False, None)
    for k in (b"1", b"2", b"3"):
        cache.put(k, k.decode())
    assert cache.get(b"1") == (False, None) and cache.get(b"3") == (True, "3")
    off: TtlCache[str] = TtlCache(0, clock=clock)
    off.put(b"x", "X")
    assert off.get(b"x") == (False, None)


class CachingVerifier(InMemoryKeyVerifier):
    """Remembers what it verified, as the remote verifier does (``cached`` answers without blocking)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Principal | None] = {}
        self.verified = 0

    def verify(self, api_key: str) -> Principal | None:
        self.verified += 1
        self.seen[api_key] = super().verify(api_key)
        return self.seen[api_key]

    def cached(self, api_key: str) -> tuple[bool, Principal | None]:
        return (api_key in self.seen), self.seen.get(api_key)


def test_the_hook_decides_inline_only_for_keys_its_verifier_has_cached() -> None:
    keys = CachingVerifier()
    hook = _hook(keys)
    secret, reader = keys.issue("acme", {REGISTRY_READ}), keys.issue("acme", {SERVING_PREDICT})
    method = f"{SVC}/GetRegisteredModel"
    assert hook.inline(method, _auth(secret)) is NOT_INLINE  # not seen yet: verify off the event loop
    first = hook(method, _auth(secret))
    assert hook.inline(method, _auth(secret)) == first and keys.verified == 1
    # A cached key is checked like any other: scope, then nothing for a public method.
    keys.verify(reader)
    with pytest.raises(PermissionDeniedError, match="lacks scope 'registry:read'"):
        hook.inline(method, _auth(reader))
    keys.seen[new_api_key().secret] = None
    unknown = next(k for k, v in keys.seen.items() if v is None)
    with pytest.raises(UnauthenticatedError):
        hook.inline(method, _auth(unknown))
    assert hook.inline(f"{SVC}/Public", ()) is None
    # A verifier without a cache never decides inline; dev mode always does.
    assert _hook(InMemoryKeyVerifier()).inline(method, _auth(secret)) is NOT_INLINE
    assert DisabledAuthHook().inline(method, ()) is DEV_PRINCIPAL
