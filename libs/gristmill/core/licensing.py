"""Enterprise licence files: Ed25519-signed claims that switch features on and set limits.

A licence file is JSON::

    {"format": "gristmill.license.v1",
     "claims": {"license_id": ..., "customer": ..., "issued_at": RFC 3339, "expires_at": RFC 3339,
                "grace_days": 14, "features": ["serving.canary", ...], "limits": {"max_registered_models": 50}},
     "signature": base64(Ed25519 signature over the canonical JSON of "claims")}

Services verify it at start (``load_license``): a missing file runs the community feature set; a file that
is malformed, tampered with or signed by another key stops the service with one line saying so. After
``expires_at`` the licence is in its grace period (features work, with warnings); after the grace period the
licensed features answer FAILED_PRECONDITION naming the licence. The clock is injectable for tests.

The private key never ships with the product: the vendor keeps it and issues files with
``gristmill-license issue`` (``gristmill.vendor.license_cli``); installs are given the public key.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gristmill.core.errors import ConfigurationError, FailedPreconditionError
from gristmill.core.values import utc_now

log = logging.getLogger(__name__)

LICENSE_FORMAT = "gristmill.license.v1"
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

    def canonical(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no spaces, times in UTC with 'Z'."""
        body = {
            "license_id": self.license_id,
            "customer": self.customer,
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
            return cls(
                license_id=str(raw["license_id"]),
                customer=str(raw["customer"]),
                issued_at=_parse_time(str(raw["issued_at"])),
                expires_at=_parse_time(str(raw["expires_at"])),
                features=frozenset(features),
                limits=limits,
                grace_days=int(raw.get("grace_days", 14)),
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

    def adopt(self, renewed: License) -> None:
        self.claims = renewed.claims

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


def parse_public_key(b64: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError):
        raise ConfigurationError("the licence public key must be base64 of 32 raw Ed25519 bytes") from None


def sign_license(claims: LicenseClaims, private_key: Ed25519PrivateKey) -> bytes:
    """The licence file's bytes for ``claims``."""
    signature = private_key.sign(claims.canonical())
    body = {
        "format": LICENSE_FORMAT,
        "claims": json.loads(claims.canonical()),
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


def verify_license(data: bytes, public_key: Ed25519PublicKey, *, clock: Clock = utc_now) -> License:
    """Parse and verify a licence file; ``ConfigurationError`` with one clear line when it is not genuine."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigurationError("licence file is not valid JSON: was it edited or truncated?") from None
    if not isinstance(raw, dict) or raw.get("format") != LICENSE_FORMAT:
        raise ConfigurationError(f"licence file is not a {LICENSE_FORMAT} licence")
    claims_raw, signature_b64 = raw.get("claims"), raw.get("signature")
    if not isinstance(claims_raw, dict) or not isinstance(signature_b64, str):
        raise ConfigurationError("licence file needs 'claims' and 'signature'")
    claims = LicenseClaims.from_mapping(claims_raw)
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(signature, claims.canonical())
    except (binascii.Error, InvalidSignature):
        raise ConfigurationError(
            f"licence {claims.license_id} is not genuine: its signature does not match its claims "
            "(tampered with, or signed by another vendor key)"
        ) from None
    # Claims that parse to the same canonical form but were written differently would verify too;
    # refusing them keeps 'what you read is what was signed' strict.
    if json.dumps(claims_raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() != claims.canonical():
        raise ConfigurationError(f"licence {claims.license_id} is not genuine: its claims were rewritten")
    return License(claims, clock)


def load_license(path: Path | None, public_key_b64: str, *, clock: Clock = utc_now) -> License:
    """The licence at ``path`` (None or missing setting: the community edition), verified."""
    if path is None:
        license_ = License(None, clock)
    else:
        if not public_key_b64:
            raise ConfigurationError("GRISTMILL_LICENSE_PUBLIC_KEY is empty: it is needed to verify the licence file")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"licence file {path} cannot be read: {exc.strerror}") from None
        license_ = verify_license(data, parse_public_key(public_key_b64), clock=clock)
    state = license_.state()
    log_at = logging.WARNING if state in (LicenseState.GRACE, LicenseState.EXPIRED) else logging.INFO
    log.log(log_at, "%s", license_.describe())
    return license_


def reload_license(license_: License, path: Path | None, public_key_b64: str) -> bool:
    """Read the licence file again (a renewed licence, on SIGHUP) and adopt it when it is genuine.

    A file that cannot be read or verified leaves the running licence in place and is logged as an error: a
    running service does not stop over a bad renewal (at start it would refuse). Returns whether it changed.
    """
    try:
        renewed = load_license(path, public_key_b64, clock=license_.clock)
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
