"""Genuine enterprise licences for tests: claims signed with a test vendor key and verified like a file.

The test key is not in the packaged key ring (no test can mint a licence a real install accepts): tests verify
against ``TEST_RING``, a ring built in code, or write ``signed_license_file`` and trust ``TEST_KEY_B64`` as a
development key.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gristmill.core.licensing import (
    KeyRing,
    License,
    LicenseClaims,
    generate_keypair,
    load_private_key,
    parse_public_key,
    sign_license,
    verify_license,
)

# Every feature a licence can grant (the community edition has none of them).
ALL_FEATURES = frozenset({"training.gpu", "serving.canary", "labeling.active_learning"})

TEST_KEY_ID = "test-vendor-1"
_TEST_PRIVATE_PEM, TEST_KEY_B64 = generate_keypair()
TEST_PRIVATE_KEY = load_private_key(_TEST_PRIVATE_PEM)
TEST_RING = KeyRing.of({TEST_KEY_ID: parse_public_key(TEST_KEY_B64)})


def license_claims(
    features: Collection[str] = ALL_FEATURES,
    limits: Mapping[str, int] | None = None,
    *,
    days: int = 365,
    now: datetime | None = None,
    license_id: str = "lic-test",
) -> LicenseClaims:
    """Claims issued a minute before ``now`` (default: the real time) for ``days``."""
    now = now or datetime.now(UTC)
    return LicenseClaims(
        license_id=license_id,
        customer="Test Customer",
        issued_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=days),
        features=frozenset(features),
        limits=dict(limits or {}),
    )


def signed_license(
    features: Collection[str] = ALL_FEATURES,
    limits: Mapping[str, int] | None = None,
    *,
    days: int = 365,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> License:
    """A licence issued now for ``days`` with ``features`` and ``limits`` (none: unlimited)."""
    claims = license_claims(features, limits, days=days, now=clock())
    data = sign_license(claims, TEST_PRIVATE_KEY, TEST_KEY_ID)
    return verify_license(data, TEST_RING, clock=clock)


def signed_license_file(path: Path, claims: LicenseClaims | None = None, *, key_id: str = "development") -> Path:
    """``claims`` (default: every feature for a year) signed with the test key under ``key_id`` into ``path``.

    A service process accepts it with ``GRISTMILL_LICENSE_DEVELOPMENT_KEY=TEST_KEY_B64`` (``key_id``
    'development') and refuses it otherwise."""
    path.write_bytes(sign_license(claims or license_claims(), TEST_PRIVATE_KEY, key_id))
    return path
