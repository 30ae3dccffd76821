"""LicenseService answers: community, valid, grace and expired states (injected clock), never the signature."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.core.license_service import LICENSE_METHOD_SCOPES, license_info
from gristmill.core.licensing import License, LicenseClaims

T0 = datetime(2026, 11, 1, tzinfo=UTC)
CLAIMS = LicenseClaims(
    "lic-9",
    "Acme",
    T0,
    T0 + timedelta(days=30),
    frozenset({"training.gpu", "serving.canary"}),
    {"max_registered_models": 5},
    7,
)


def test_community_edition_without_a_licence_file() -> None:
    info = license_info(License(), "registry")
    assert (info.state, info.service, info.license_id) == (pb.LICENSE_STATE_COMMUNITY, "registry", "")
    assert "community edition" in info.message
    assert not info.HasField("expire_time")


@pytest.mark.parametrize(
    ("at", "state", "words"),
    [
        (T0 + timedelta(days=1), pb.LICENSE_STATE_VALID, "valid until 2026-12-01T00:00:00Z"),
        (T0 + timedelta(days=31), pb.LICENSE_STATE_GRACE, "licensed features stop after 2026-12-08T00:00:00Z"),
        (T0 + timedelta(days=38), pb.LICENSE_STATE_EXPIRED, "grace period is over"),
    ],
)
def test_licence_states_follow_the_clock(at: datetime, state: int, words: str) -> None:
    info = license_info(License(CLAIMS, clock=lambda: at), "serving")
    assert info.state == state and words in info.message
    assert (info.license_id, info.customer) == ("lic-9", "Acme")
    assert info.expire_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=30)
    assert info.grace_end_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=37)
    assert list(info.features) == ["serving.canary", "training.gpu"]
    assert dict(info.limits) == {"max_registered_models": 5}


def test_get_license_needs_an_authenticated_caller_but_no_scope() -> None:
    assert LICENSE_METHOD_SCOPES == {"/gristmill.api.admin.v1.LicenseService/GetLicense": ""}
