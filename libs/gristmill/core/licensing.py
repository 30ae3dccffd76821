"""Enterprise licence files: Ed25519-signed claims that switch features on and set limits.

A licence file is JSON::

    {"format": "gristmill.license.v2",
     "claims": {"license_id": ..., "customer": ..., "key_id": "gristmill-2026-1",
                "issued_at": RFC 3339, "expires_at": RFC 3339, "grace_days": 14,
                "features": ["serving.canary", ...], "limits": {"max_registered_models": 50}},
     "signature": base64(Ed25519 signature over the canonical JSON of "claims")}

Services verify it at start (``load_license``): a missing file runs the community feature set; a file that
is malformed, tampered with, signed with a key this release does not trust or by another key than the one it
names stops the service with one line saying so. After ``expires_at`` the licence is in its grace period
(features work, with warnings); after the grace period the licensed features answer FAILED_PRECONDITION naming
the licence. The clock is injectable for tests.

Trust: the vendor's public keys ship inside the package (``license_keys.json`` beside this module, the
*key ring*), each with the id that licences name in their signed ``key_id`` claim. An operator cannot add a key
to it, so a key pair made with ``gristmill-license keygen`` cannot mint licences an install accepts. The vendor
rotates by adding a key to the ring (licences name the new id), then giving the old key a ``not_after`` (no
licence issued after it verifies) and finally removing it. The only way to trust another key is the
development mode: ``GRISTMILL_LICENSE_DEVELOPMENT_KEY`` adds a key under the id ``development``, logged at
WARNING at every start and reported by ``LicenseService`` (``development_key``).

``gristmill.license.v1`` files named no key; no vendor ring key ever signed one (their key was an operator
setting), so they are refused with a line asking for a reissued licence rather than read.

The private keys never ship with the product: the vendor keeps them and issues files with
``gristmill-license issue --key-id`` (``gristmill.vendor.license_cli``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gristmill.core.errors import ConfigurationError, FailedPreconditionError
from gristmill.core.values import utc_now

log = logging.getLogger(__name__)

LICENSE_FORMAT = "gristmill.license.v2"
# The format before licences named their key: refused with a line saying so (see the module docstring).
_UNKEYED_FORMAT = "gristmill.license.v1"
KEY_RING_FORMAT = "gristmill.license-keys.v1"
# The packaged key ring: package data of gristmill.core (libs/pyproject.toml lists it).
KEY_RING_RESOURCE = "license_keys.json"
# The id a development key is trusted under; reserved, so the vendor ring never uses it.
DEVELOPMENT_KEY_ID = "development"
DEVELOPMENT_KEY_SETTING = "GRISTMILL_LICENSE_DEVELOPMENT_KEY"
DEVELOPMENT_KEY_WARNING = (
    f"development licence key in use ({DEVELOPMENT_KEY_SETTING}): licences signed by it are trusted; "
    "never set this in production"
)
# Key ids are written into licences and error lines: short, lower case, no spaces.
_KEY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
Clock = Callable[[], datetime]

# What an install without a licence file may do.
COMMUNITY_FEATURES: frozenset[str] = frozenset()
COMMUNITY_LIMITS: Mapping[str, int] = {
    "max_registered_models": 10,
    "max_training_workers": 2,
    "max_serving_models": 2,
}


class LicenseState(Enum):
    COMMUNITY = "community"
    VALID = "valid"
    GRACE = "grace"
    EXPIRED = "expired"


@dataclass(frozen=True)
class LicenseClaims:
    license_id: str
    customer: str
    issued_at: datetime
    expires_at: datetime
    features: frozenset[str] = frozenset()
    limits: Mapping[str, int] = field(default_factory=dict)
    grace_days: int = 14
    # The ring key that signs these claims; inside the signed claims, so it cannot be swapped. ``sign_license``
    # sets it.
    key_id: str = ""

    def canonical(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no spaces, times in UTC with 'Z'."""
        body = {
            "license_id": self.license_id,
            "customer": self.customer,
            "key_id": self.key_id,
            "issued_at": _format_time(self.issued_at),
            "expires_at": _format_time(self.expires_at),
            "grace_days": self.grace_days,
            "features": sorted(self.features),
            "limits": dict(sorted(self.limits.items())),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> LicenseClaims:
        try:
            limits = {str(k): int(v) for k, v in dict(raw.get("limits", {})).items()}
            features = raw.get("features", [])
            if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                raise ValueError("features must be a list of strings")
            # Checked before it is quoted in an error line: a key id from a file must not break that line.
            if not isinstance(raw.get("key_id"), str) or not _KEY_ID.match(raw["key_id"]):
                raise ValueError("key_id must name the signing key (lower-case letters, digits, '.', '_', '-')")
            return cls(
                license_id=str(raw["license_id"]),
                customer=str(raw["customer"]),
                issued_at=_parse_time(str(raw["issued_at"])),
                expires_at=_parse_time(str(raw["expires_at"])),
                features=frozenset(features),
                limits=limits,
                grace_days=int(raw.get("grace_days", 14)),
                key_id=str(raw["key_id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"licence claims are malformed: {exc}") from None


@dataclass
class License:
    """The licence a service runs under (``claims`` is None for the community edition).

    One object per process, shared by everything that checks it; ``adopt`` swaps in a renewed licence in place
    (``reload_license``), so every holder sees the new claims at once.
    """

    claims: LicenseClaims | None = None
    clock: Clock = utc_now
    # This process trusts a development key (GRISTMILL_LICENSE_DEVELOPMENT_KEY): reported, never hidden.
    development_key: bool = False

    def adopt(self, renewed: License) -> None:
        self.claims = renewed.claims
        self.development_key = renewed.development_key

    @property
    def grace_end(self) -> datetime | None:
        return None if self.claims is None else self.claims.expires_at + timedelta(days=self.claims.grace_days)

    def state(self) -> LicenseState:
        if self.claims is None:
            return LicenseState.COMMUNITY
        now = self.clock()
        if now < self.claims.expires_at:
            return LicenseState.VALID
        grace_end = self.grace_end
        if grace_end is not None and now < grace_end:
            return LicenseState.GRACE
        return LicenseState.EXPIRED

    def describe(self) -> str:
        """One line for people and logs."""
        text = self._describe_state()
        if self.development_key:
            text += f"; {DEVELOPMENT_KEY_WARNING}"
        return text

    def _describe_state(self) -> str:
        state = self.state()
        if self.claims is None:
            return "no licence file: community edition"
        lid = self.claims.license_id
        if state is LicenseState.VALID:
            return f"licence {lid} for {self.claims.customer} valid until {_format_time(self.claims.expires_at)}"
        if state is LicenseState.GRACE:
            return (
                f"licence {lid} expired on {_format_time(self.claims.expires_at)}; licensed features stop after "
                f"{_format_time(self.grace_end or self.claims.expires_at)}: renew it"
            )
        return f"licence {lid} expired on {_format_time(self.claims.expires_at)} and its grace period is over"

    def _active_claims(self) -> LicenseClaims | None:
        state = self.state()
        if state is LicenseState.GRACE:
            log.warning("%s", self.describe())
        return self.claims if state in (LicenseState.VALID, LicenseState.GRACE) else None

    def has_feature(self, feature: str) -> bool:
        claims = self._active_claims()
        features = COMMUNITY_FEATURES if claims is None else claims.features
        return feature in features

    def require_feature(self, feature: str) -> None:
        """Raise FAILED_PRECONDITION naming the licence when ``feature`` is not licensed now."""
        if self.has_feature(feature):
            return
        if self.claims is None:
            raise FailedPreconditionError(
                f"{feature} needs an enterprise licence (this install runs the community edition)"
            )
        if self.state() is LicenseState.EXPIRED:
            raise FailedPreconditionError(f"{feature} is not available: {self.describe()}")
        raise FailedPreconditionError(f"{feature} is not included in licence {self.claims.license_id}")

    def limit(self, name: str) -> int | None:
        """The licensed limit (None: unlimited); community limits apply without a valid licence."""
        claims = self._active_claims()
        if claims is None:
            return COMMUNITY_LIMITS.get(name)
        return claims.limits.get(name)

    def check_limit(self, name: str, requested: int) -> None:
        """Refuse with FAILED_PRECONDITION when ``requested`` (the count after the change) exceeds the limit."""
        allowed = self.limit(name)
        if allowed is not None and requested > allowed:
            where = "the community edition" if self.claims is None else f"licence {self.claims.license_id}"
            raise FailedPreconditionError(f"{name} is {allowed} under {where}; this would make it {requested}")


# --------------------------------------------------------------------------- the key ring


@dataclass(frozen=True)
class TrustedKey:
    """A public key licences may be signed with, under the id they name in their ``key_id`` claim."""

    key_id: str
    public_key: Ed25519PublicKey
    # The key is retired for licences issued after this time (rotation): older ones keep verifying until the
    # key leaves the ring. None: current.
    not_after: datetime | None = None

    def current_at(self, when: datetime) -> bool:
        return self.not_after is None or when <= self.not_after


@dataclass(frozen=True)
class KeyRing:
    """The keys a licence may be signed with, by id: the vendor's (``vendor_key_ring``), and in the development
    mode one more (``with_development_key``). Tests build one in code."""

    keys: tuple[TrustedKey, ...]

    def __post_init__(self) -> None:
        ids = [key.key_id for key in self.keys]
        duplicated = sorted({key_id for key_id in ids if ids.count(key_id) > 1})
        if duplicated:
            raise ConfigurationError(f"licence key ring names key {duplicated[0]!r} more than once")
        for key_id in ids:
            if not _KEY_ID.match(key_id):
                raise ConfigurationError(f"licence key id {key_id!r} must be lower-case letters, digits, '.', '_', '-'")

    @classmethod
    def of(cls, keys: Mapping[str, Ed25519PublicKey]) -> KeyRing:
        """A ring of current keys, by id (tests; the vendor tool's development keys)."""
        return cls(tuple(TrustedKey(key_id, key) for key_id, key in keys.items()))

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> KeyRing:
        """Parse a ring file: ``{"format": ..., "keys": [{"key_id", "public_key", "not_after"?}]}``.

        The development id is refused here: only ``with_development_key`` may add it, so that it is logged."""
        try:
            raw = json.loads(data.decode("utf-8"))
            if not isinstance(raw, dict) or raw.get("format") != KEY_RING_FORMAT:
                raise ValueError(f"it is not a {KEY_RING_FORMAT} key ring")
            entries = raw.get("keys")
            if not isinstance(entries, list) or not entries:
                raise ValueError("it has no 'keys'")
            keys = tuple(_trusted_key(entry) for entry in entries)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, ConfigurationError) as exc:
            raise ConfigurationError(f"licence key ring {source} is malformed: {exc}") from None
        if any(key.key_id == DEVELOPMENT_KEY_ID for key in keys):
            raise ConfigurationError(f"licence key ring {source} uses the reserved key id {DEVELOPMENT_KEY_ID!r}")
        return cls(keys)

    def find(self, key_id: str) -> TrustedKey | None:
        return next((key for key in self.keys if key.key_id == key_id), None)

    def current_key_ids(self, when: datetime) -> list[str]:
        """The ids a licence issued at ``when`` may be signed with, in ring order."""
        return [key.key_id for key in self.keys if key.current_at(when)]

    @property
    def has_development_key(self) -> bool:
        return self.find(DEVELOPMENT_KEY_ID) is not None

    def with_development_key(self, public_key_b64: str) -> KeyRing:
        """This ring and a development key (base64 of its 32 raw bytes) under the id ``development``."""
        key = parse_public_key(public_key_b64, setting=DEVELOPMENT_KEY_SETTING)
        kept = tuple(k for k in self.keys if k.key_id != DEVELOPMENT_KEY_ID)
        return KeyRing((*kept, TrustedKey(DEVELOPMENT_KEY_ID, key)))


def _trusted_key(entry: object) -> TrustedKey:
    if not isinstance(entry, dict):
        raise ValueError("each key must be an object")
    unknown = sorted(set(entry) - {"key_id", "public_key", "not_after"})
    if unknown:
        # A misspelt 'not_after' must not leave a retired key current.
        raise ValueError(f"key {entry.get('key_id')!r} has unknown fields {unknown}")
    key_id, public_key = entry["key_id"], entry["public_key"]
    if not isinstance(key_id, str) or not isinstance(public_key, str):
        raise ValueError("key_id and public_key must be strings")
    not_after = entry.get("not_after")
    return TrustedKey(
        key_id,
        parse_public_key(public_key, setting=f"public_key of {key_id!r}"),
        None if not_after is None else _parse_time(str(not_after)),
    )


@functools.cache
def vendor_key_ring() -> KeyRing:
    """The vendor keys this release trusts: ``license_keys.json``, shipped inside the package."""
    try:
        data = resources.files("gristmill.core").joinpath(KEY_RING_RESOURCE).read_bytes()
    except OSError:
        raise ConfigurationError(
            f"the licence key ring gristmill/core/{KEY_RING_RESOURCE} is missing from this install: "
            "reinstall gristmill-libs"
        ) from None
    return KeyRing.from_json(data, source=f"gristmill/core/{KEY_RING_RESOURCE}")


# --------------------------------------------------------------------------- signing and verifying


def generate_keypair() -> tuple[bytes, str]:
    """A new vendor key pair: (private key PEM, public key as base64 of its 32 raw bytes)."""
    from cryptography.hazmat.primitives import serialization

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, public_key_b64(private.public_key())


def public_key_b64(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError("the signing key is not an Ed25519 private key")
    return key


def parse_public_key(b64: str, *, setting: str = "the licence public key") -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes; ``setting`` names it in the error."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise ConfigurationError(
            f"{setting} must be base64 of 32 raw Ed25519 bytes (the public.b64 that gristmill-license keygen writes)"
        ) from None


def sign_license(claims: LicenseClaims, private_key: Ed25519PrivateKey, key_id: str) -> bytes:
    """The licence file's bytes for ``claims``, signed by ``private_key``, which the ring knows as ``key_id``."""
    if not _KEY_ID.match(key_id):
        raise ConfigurationError(f"key id {key_id!r} must be lower-case letters, digits, '.', '_', '-'")
    claims = replace(claims, key_id=key_id)
    signature = private_key.sign(claims.canonical())
    body = {
        "format": LICENSE_FORMAT,
        "claims": json.loads(claims.canonical()),
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


def verify_license(data: bytes, ring: KeyRing, *, clock: Clock = utc_now) -> License:
    """Parse a licence file and verify it with the ``ring`` key it names; ``ConfigurationError`` with one clear
    line when it is not genuine or its key is not trusted."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigurationError("licence file is not valid JSON: was it edited or truncated?") from None
    if isinstance(raw, dict) and raw.get("format") == _UNKEYED_FORMAT:
        raise ConfigurationError(
            f"licence file is a {_UNKEYED_FORMAT} licence, which names no vendor key and is no longer accepted: "
            f"ask your vendor for a {LICENSE_FORMAT} licence signed with one of: {_listed(ring, clock())}"
        )
    if not isinstance(raw, dict) or raw.get("format") != LICENSE_FORMAT:
        raise ConfigurationError(f"licence file is not a {LICENSE_FORMAT} licence")
    claims_raw, signature_b64 = raw.get("claims"), raw.get("signature")
    if not isinstance(claims_raw, dict) or not isinstance(signature_b64, str):
        raise ConfigurationError("licence file needs 'claims' and 'signature'")
    claims = LicenseClaims.from_mapping(claims_raw)
    trusted = ring.find(claims.key_id)
    if trusted is None:
        raise ConfigurationError(
            f"licence {claims.license_id} is signed with key '{claims.key_id}', which this release does not trust; "
            f"ask your vendor for a licence signed with one of: {_listed(ring, clock())}"
        )
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        trusted.public_key.verify(signature, claims.canonical())
    except (binascii.Error, InvalidSignature):
        raise ConfigurationError(
            f"licence {claims.license_id} is not genuine: its signature does not match its claims "
            f"(tampered with, or not signed by vendor key '{claims.key_id}')"
        ) from None
    # Claims that parse to the same canonical form but were written differently would verify too;
    # refusing them keeps 'what you read is what was signed' strict.
    if json.dumps(claims_raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() != claims.canonical():
        raise ConfigurationError(f"licence {claims.license_id} is not genuine: its claims were rewritten")
    # Checked once the signature holds: before that, issued_at could be anything.
    if not trusted.current_at(claims.issued_at):
        raise ConfigurationError(
            f"licence {claims.license_id} was issued on {_format_time(claims.issued_at)} with key '{claims.key_id}', "
            f"retired for licences issued after {_format_time(trusted.not_after or claims.issued_at)}; "
            f"ask your vendor for a licence signed with one of: {_listed(ring, clock())}"
        )
    return License(claims, clock, development_key=ring.has_development_key)


def _listed(ring: KeyRing, when: datetime) -> str:
    """The ids a new licence may name, for error lines."""
    return ", ".join(f"'{key_id}'" for key_id in ring.current_key_ids(when)) or "(none: no key is current)"


def load_license(
    path: Path | None, development_key: str = "", *, ring: KeyRing | None = None, clock: Clock = utc_now
) -> License:
    """The licence at ``path`` (None: the community edition), verified with the vendor key ring (``ring``:
    another one, for tests), plus ``development_key`` (base64; empty: none) when the development mode sets one."""
    if development_key:
        log.warning("%s", DEVELOPMENT_KEY_WARNING)
    if path is None:
        if development_key:
            parse_public_key(development_key, setting=DEVELOPMENT_KEY_SETTING)  # a bad value fails at start
        license_ = License(None, clock, development_key=bool(development_key))
    else:
        trusted = vendor_key_ring() if ring is None else ring
        if development_key:
            trusted = trusted.with_development_key(development_key)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"licence file {path} cannot be read: {exc.strerror}") from None
        license_ = verify_license(data, trusted, clock=clock)
    state = license_.state()
    log_at = logging.WARNING if state in (LicenseState.GRACE, LicenseState.EXPIRED) else logging.INFO
    log.log(log_at, "%s", license_.describe())
    return license_


def reload_license(
    license_: License, path: Path | None, development_key: str = "", *, ring: KeyRing | None = None
) -> bool:
    """Read the licence file again (a renewed licence, on SIGHUP) and adopt it when it is genuine.

    A file that cannot be read or verified leaves the running licence in place and is logged as an error: a
    running service does not stop over a bad renewal (at start it would refuse). Returns whether it changed.
    """
    try:
        renewed = load_license(path, development_key, ring=ring, clock=license_.clock)
    except ConfigurationError as exc:
        log.error("licence reload refused, keeping the current one (%s): %s", license_.describe(), exc)
        return False
    license_.adopt(renewed)
    log.warning("licence reloaded: %s", license_.describe())
    return True


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return parsed.astimezone(UTC)
