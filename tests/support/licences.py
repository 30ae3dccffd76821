"""Genuine enterprise licences for tests: claims signed with a fresh vendor key and verified like a file."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta

from gristmill.core.licensing import (
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


def signed_license(
    features: Collection[str] = ALL_FEATURES,
    limits: Mapping[str, int] | None = None,
    *,
    days: int = 365,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> License:
    """A licence issued now for ``days`` with ``features`` and ``limits`` (none: unlimited)."""
    private_pem, public_b64 = generate_keypair()
    now = clock()
    claims = LicenseClaims(
        license_id="lic-test",
        customer="Test Customer",
        issued_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=days),
        features=frozenset(features),
        limits=dict(limits or {}),
    )
    data = sign_license(claims, load_private_key(private_pem))
    return verify_license(data, parse_public_key(public_b64), clock=clock)
