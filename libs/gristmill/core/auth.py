"""API keys, scopes and the caller's identity: what every service's auth check is made of.

A key is ``gmk_<key id>_<secret>``. It is shown once, when created (or rotated); the key store keeps only
a salted PBKDF2 hash of it and compares in constant time. The key id is not secret: it names the key in
listings, usage and logs. Each key belongs to one organisation and carries scopes (``SCOPES``); ``admin``
implies every other scope within the key's organisation.

One hook checks every call (``ApiKeyAuthHook``, plugged into ``ServiceHost(auth_hook=...)``): it reads
metadata ``authorization: Bearer <key>``, asks an ``ApiKeyVerifier`` who the key belongs to, and checks the
scope the method needs (``method_scopes``, fail closed: a method not listed is refused). Answers:

- UNAUTHENTICATED: no key, a malformed header, or a key that is unknown, expired or revoked;
- PERMISSION_DENIED: the key lacks the method's scope, or the method is not open to API keys at all.

The servicer then reads the caller with ``current_principal()`` and keeps other organisations' objects
invisible with ``require_same_org`` (they answer NOT_FOUND, exactly as a missing object would).

Wiring a service (the one line to adopt; see services/admin/README.md; ``build_auth_hook`` lives in
``gristmill.core.security``, which builds what a process needs, so that this module imports no client of the
admin service)::

    auth_hook = build_auth_hook(auth_settings, method_scopes=MY_SCOPES, embedded=not kafka.bootstrap_servers)
    ServiceHost(platform, registrations, settings, subscriptions, auth_hook=auth_hook)

Auth can be switched off (``GRISTMILL_AUTH_DISABLED=true``) only in the embedded dev mode; the service then
says so at WARNING when it starts, and every call runs as ``DEV_PRINCIPAL`` (default organisation, every
scope).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gristmill.core.errors import (
    ConfigurationError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from gristmill.core.grpcserver import NOT_INLINE, call_identity
from gristmill.core.ids import validate_id
from gristmill.core.values import DEFAULT_ORGANIZATION

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- scopes and organisations

LABELING_READ = "labeling:read"
LABELING_WRITE = "labeling:write"
TRAINING_SUBMIT = "training:submit"
REGISTRY_READ = "registry:read"
REGISTRY_PROMOTE = "registry:promote"
SERVING_PREDICT = "serving:predict"
ADMIN = "admin"
SCOPES: frozenset[str] = frozenset(
    {LABELING_READ, LABELING_WRITE, TRAINING_SUBMIT, REGISTRY_READ, REGISTRY_PROMOTE, SERVING_PREDICT, ADMIN}
)
# A ``method_scopes`` value meaning "any valid key, no particular scope" (WhoAmI, GetLicense).
AUTHENTICATED = ""

# Who may change something may read it (``admin`` implies every scope).
IMPLIED_SCOPES: Mapping[str, frozenset[str]] = {
    LABELING_WRITE: frozenset({LABELING_READ}),
    REGISTRY_PROMOTE: frozenset({REGISTRY_READ}),
}


def validate_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes as a set; INVALID_ARGUMENT for none or for one that does not exist."""
    given = [str(s) for s in scopes]
    if not given:
        raise InvalidArgumentError(f"at least one scope is needed; choose from {', '.join(sorted(SCOPES))}")
    unknown = sorted({s for s in given if s not in SCOPES})
    if unknown:
        shown = ", ".join(repr(s[:64]) for s in unknown[:5])
        raise InvalidArgumentError(f"unknown scope {shown}; choose from {', '.join(sorted(SCOPES))}")
    return frozenset(given)


def organization_or_default(organization_id: str) -> str:
    """An organisation id from a request or an event: empty means ``DEFAULT_ORGANIZATION``."""
    return validate_id(organization_id, what="organization_id") if organization_id else DEFAULT_ORGANIZATION


# --------------------------------------------------------------------------- the caller


@dataclass(frozen=True)
class Principal:
    """Who makes the current call: the key's organisation, the key id and its scopes (never the secret)."""

    organization_id: str
    api_key_id: str
    scopes: frozenset[str]
    # True when auth is off (embedded dev mode): the caller is nobody in particular, allowed everything.
    auth_disabled: bool = False

    def has_scope(self, scope: str) -> bool:
        return (
            scope == AUTHENTICATED
            or ADMIN in self.scopes
            or scope in self.scopes
            or any(scope in IMPLIED_SCOPES.get(held, ()) for held in self.scopes)
        )

    @property
    def actor(self) -> str:
        """How history records ("actor" of an alias change, usage) name this caller."""
        return f"key/{self.api_key_id}" if self.api_key_id else "anonymous"


DEV_PRINCIPAL = Principal(DEFAULT_ORGANIZATION, "", SCOPES, auth_disabled=True)


def current_principal() -> Principal:
    """The caller of the gRPC call being served (also inside ``asyncio.to_thread`` from the servicer).

    UNAUTHENTICATED outside an authenticated call: a service that forgot its auth hook fails closed.
    """
    identity = call_identity()
    if isinstance(identity, Principal):
        return identity
    raise UnauthenticatedError("this call carries no authenticated caller: send 'authorization: Bearer <api key>'")


def current_organization() -> str:
    """The caller's organisation (its API key's; the default one with auth off): what servicers scope by."""
    return current_principal().organization_id


def optional_principal() -> Principal | None:
    """The caller, or None on a public method or outside a call."""
    identity = call_identity()
    return identity if isinstance(identity, Principal) else None


def require_scope(scope: str, principal: Principal | None = None) -> Principal:
    """PERMISSION_DENIED unless the caller has ``scope`` (for checks finer than the method's own scope)."""
    caller = principal or current_principal()
    if not caller.has_scope(scope):
        raise PermissionDeniedError(f"API key {caller.api_key_id} lacks scope {scope!r}")
    return caller


def require_same_org(object_org: str, not_found_message: str, principal: Principal | None = None) -> None:
    """NOT_FOUND (with the caller's usual "not found" message) for an object of another organisation.

    Pass the very message a missing object gets, so that an object of another organisation cannot be told
    apart from one that does not exist.
    """
    caller = principal or current_principal()
    if caller.organization_id != (object_org or DEFAULT_ORGANIZATION):
        raise NotFoundError(not_found_message)


# --------------------------------------------------------------------------- keys

KEY_PREFIX = "gmk"
_KEY_ID_HEX = 16
_SECRET_BYTES = 32
_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{{_KEY_ID_HEX}}})_([A-Za-z0-9_-]{{43}})$")
# 256 random bits cannot be guessed, so stretching is defence in depth only: PBKDF2 at a cost (~4 ms) that
# a per-call check can afford. The cost is stored with each hash so that it can be raised later.
_HASH_ALGORITHM = "pbkdf2_sha256"
_HASH_ITERATIONS = 20_000
_SALT_BYTES = 16
# Shown in listings to recognise a key: the prefix and the start of the key id, nothing of the secret.
_SHOWN_PREFIX = len(KEY_PREFIX) + 1 + 8


@dataclass(frozen=True)
class IssuedKey:
    """A freshly made key. ``secret`` (the whole key text) is shown to its owner once and never stored."""

    api_key_id: str
    secret: str = field(repr=False)
    secret_hash: str = field(repr=False)
    secret_prefix: str


def new_api_key() -> IssuedKey:
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii").rstrip("=")
    text = f"{KEY_PREFIX}_{key_id}_{secret}"
    return IssuedKey(key_id, text, hash_api_key(text), text[:_SHOWN_PREFIX])


def api_key_id_of(api_key: str) -> str | None:
    """The key id inside a presented key, or None when the text is not a Gristmill key."""
    match = _KEY.fullmatch(api_key)
    return match.group(1) if match else None


def hash_api_key(api_key: str, *, salt: bytes | None = None, iterations: int = _HASH_ITERATIONS) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<digest>`` (base64) with a fresh random salt unless given."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", api_key.encode("utf-8"), salt, iterations)
    return "$".join((_HASH_ALGORITHM, str(iterations), _b64(salt), _b64(digest)))


def check_api_key(api_key: str, stored_hash: str) -> bool:
    """Whether ``api_key`` is the key ``stored_hash`` was made from (constant-time comparison)."""
    try:
        algorithm, iterations, salt, digest = stored_hash.split("$")
        if algorithm != _HASH_ALGORITHM:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha256", api_key.encode("utf-8"), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


class MatchedKeys:
    """Which presented keys matched which stored hashes, so that a key presented again is checked with one
    SHA-256 instead of ``check_api_key``'s 20,000 PBKDF2 rounds (~10 ms of CPU: the admin service verified
    every call of the other services' quota refreshes that way). An entry pairs the key's digest (never the
    key) with the stored hash it matched, so a key whose secret was replaced is checked afresh; a revoked or
    expired key is refused by the caller's check of the stored key, made on every call. Only matches are
    remembered: a wrong key pays the full check every time. Thread-safe; bounded (least recently used out)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, api_key: str, stored_hash: str) -> bool:
        """``check_api_key(api_key, stored_hash)``, from memory when this pair matched before."""
        digest = hashlib.sha256(api_key.encode("utf-8")).digest()
        with self._lock:
            if self._entries.get(digest) == stored_hash:
                self._entries.move_to_end(digest)
                return True
        if not check_api_key(api_key, stored_hash):
            return False
        with self._lock:
            self._entries[digest] = stored_hash
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ApiKeyVerifier(ABC):
    """Tells who a presented key belongs to. The key store verifies locally; other services ask the
    admin service (``gristmill.core.auth_remote.RemoteKeyVerifier``)."""

    @abstractmethod
    def verify(self, api_key: str) -> Principal | None:
        """The key's principal; None when the key is unknown, expired or revoked.

        Called with well-formed keys only (``api_key_id_of`` is not None). May raise ``UnavailableError``
        when the verifier cannot answer now.
        """

    def cached(self, api_key: str) -> tuple[bool, Principal | None]:
        """(known, principal) without blocking: a verifier with a cache answers from it; (False, None) means
        ``verify`` must run (off the event loop)."""
        return False, None

    def close(self) -> None:
        """Release what the verifier holds (a channel to the admin service); nothing by default."""
        return None


# --------------------------------------------------------------------------- the hook


def bearer_api_key(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The key from ``authorization: Bearer <key>``; UNAUTHENTICATED when missing or malformed."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise UnauthenticatedError("missing API key: send metadata 'authorization: Bearer <api key>'")
    if len(values) > 1:
        raise UnauthenticatedError("send exactly one 'authorization' metadata entry")
    raw = values[0]
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    scheme, _, credential = text.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise UnauthenticatedError("malformed authorization metadata: expected 'Bearer <api key>'")
    if api_key_id_of(credential) is None:
        # Never echo the credential: it may be a real secret pasted in the wrong place.
        raise UnauthenticatedError(f"malformed API key: Gristmill keys look like '{KEY_PREFIX}_<key id>_<secret>'")
    return credential


# A root-organisation admin key (a service's own key) may act for another organisation by naming it here:
# serving reads a deployment's model from the registry as the deployment's organisation.
ACT_FOR_ORGANIZATION = "gristmill-act-for-organization"


def act_for_organization(
    principal: Principal, metadata: Sequence[tuple[str, str | bytes]], root_organization_id: str
) -> Principal:
    """``principal``, or, when the call names another organisation to act for, that organisation's view of it.

    Only admin keys of the root organisation may; anyone else naming one is PERMISSION_DENIED.
    """
    values = [v for k, v in metadata if k.lower() == ACT_FOR_ORGANIZATION]
    if not values:
        return principal
    raw = values[-1]
    organization_id = validate_id(
        raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw, what=ACT_FOR_ORGANIZATION
    )
    if principal.organization_id != root_organization_id or ADMIN not in principal.scopes:
        raise PermissionDeniedError(
            f"API key {principal.api_key_id} may not act for another organisation: only admin keys of the root "
            "organisation may send " + ACT_FOR_ORGANIZATION
        )
    return Principal(organization_id, principal.api_key_id, principal.scopes)


class ApiKeyAuthHook:
    """The ``AuthHook`` of a service whose calls need API keys.

    ``method_scopes`` maps a full method name (``/gristmill.api.registry.v1.RegistryService/SetAlias``) or a
    whole service (``/gristmill.api.registry.v1.RegistryService/*``) to the scope it needs; the exact method
    wins. ``AUTHENTICATED`` means any valid key. ``public`` methods need no key at all. Any other method is
    refused with PERMISSION_DENIED (fail closed), so an RPC added later is closed until it is given a scope.
    Health and reflection never reach the hook (``grpcserver.AuthInterceptor``).
    """

    def __init__(
        self,
        verifier: ApiKeyVerifier,
        method_scopes: Mapping[str, str],
        *,
        public: Collection[str] = (),
        root_organization_id: str = DEFAULT_ORGANIZATION,
    ) -> None:
        unknown = sorted({s for s in method_scopes.values() if s != AUTHENTICATED and s not in SCOPES})
        if unknown:
            raise ConfigurationError(f"method_scopes names unknown scopes {unknown}; choose from {sorted(SCOPES)}")
        self._verifier = verifier
        self._scopes = dict(method_scopes)
        self._public = frozenset(public)
        self._root_organization_id = root_organization_id

    def close(self) -> None:
        self._verifier.close()

    def scope_for(self, method: str) -> str | None:
        """The scope ``method`` needs; None when it is not open to API keys."""
        if method in self._scopes:
            return self._scopes[method]
        service = method.rsplit("/", 1)[0]
        return self._scopes.get(f"{service}/*")

    def __call__(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Principal | None:
        if method in self._public:
            return None
        api_key = bearer_api_key(metadata)
        return self._admit(method, metadata, api_key, self._verifier.verify(api_key))

    def inline(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> object | None:
        """The same decision on the event loop when the key is in the verifier's cache (``NOT_INLINE`` else)."""
        if method in self._public:
            return None
        api_key = bearer_api_key(metadata)
        known, principal = self._verifier.cached(api_key)
        if not known:
            return NOT_INLINE
        return self._admit(method, metadata, api_key, principal)

    def _admit(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], api_key: str, principal: Principal | None
    ) -> Principal:
        if principal is None:
            raise UnauthenticatedError(
                f"API key {api_key_id_of(api_key)} is unknown, expired or revoked: ask an admin for a valid key"
            )
        scope = self.scope_for(method)
        if scope is None:
            raise PermissionDeniedError(f"{method} is not open to API keys")
        if not principal.has_scope(scope):
            raise PermissionDeniedError(
                f"API key {principal.api_key_id} lacks scope {scope!r}, which {method.rsplit('/', 1)[-1]} needs"
            )
        return act_for_organization(principal, metadata, self._root_organization_id)


class DisabledAuthHook:
    """Embedded dev mode only: every call is allowed and runs as ``DEV_PRINCIPAL``."""

    def __call__(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        return DEV_PRINCIPAL

    def inline(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        return DEV_PRINCIPAL


class AuthSettings(BaseSettings):
    """API-key auth of one service process (environment prefix ``GRISTMILL_AUTH_``)."""

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_AUTH_", extra="ignore", frozen=True)

    # Only the embedded dev mode (no Kafka configured) may switch auth off; a networked service refuses to.
    disabled: bool = False
    # host:port of the admin service, which owns the keys (services other than admin verify keys there).
    admin_address: str = ""
    # How long a verified key (and an organisation's plan) is trusted before asking again: a revoked key
    # stops working within this time.
    cache_ttl_s: float = Field(default=30.0, ge=0)
    # How often a quota guard reads its organisations' usage totals (and plans) again in the background: with
    # several replicas, the others' usage counts here within about this time (see gristmill.core.auth_quota).
    quota_refresh_s: float = Field(default=1.0, gt=0)
    # This service's own key (a root-organisation admin key), to read plans and usage for quotas and to call
    # other services for an organisation.
    service_key: SecretStr = SecretStr("")
    # The installation's own organisation (as GRISTMILL_ADMIN_ROOT_ORGANIZATION_ID): its admin keys may act
    # for another organisation.
    root_organization_id: str = DEFAULT_ORGANIZATION
