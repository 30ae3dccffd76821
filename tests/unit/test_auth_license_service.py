"""LicenseService answers: community, valid, grace and expired states (injected clock), the signing key id and
whether a development key is trusted, never the signature."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.core.license_service import LICENSE_METHOD_SCOPES, license_info
from gristmill.core.licensing import DEVELOPMENT_KEY_WARNING, License, LicenseClaims, load_license
from tests.support.licences import TEST_KEY_B64, signed_license_file

T0 = datetime(2026, 11, 1, tzinfo=UTC)
CLAIMS = LicenseClaims(
    "lic-9",
    "Acme",
    T0,
    T0 + timedelta(days=30),
    frozenset({"training.gpu", "serving.canary"}),
    {"max_registered_models": 5},
    7,
    "gristmill-2026-1",
)


def test_community_edition_without_a_licence_file() -> None:
    info = license_info(License(), "registry")
    assert (info.state, info.service, info.license_id) == (pb.LICENSE_STATE_COMMUNITY, "registry", "")
    assert "community edition" in info.message
    assert not info.HasField("expire_time")
    assert (info.key_id, info.development_key) == ("", False)


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
    assert (info.license_id, info.customer, info.key_id, info.development_key) == (
        "lic-9",
        "Acme",
        "gristmill-2026-1",
        False,
    )
    assert info.expire_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=30)
    assert info.grace_end_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=37)
    assert list(info.features) == ["serving.canary", "training.gpu"]
    assert dict(info.limits) == {"max_registered_models": 5}


def test_a_development_key_is_reported_with_and_without_a_licence(tmp_path: Path) -> None:
    path = signed_license_file(tmp_path / "dev.license")  # signed with the test key, id 'development'
    info = license_info(load_license(path, TEST_KEY_B64), "serving")
    assert (info.state, info.key_id, info.development_key) == (pb.LICENSE_STATE_VALID, "development", True)
    assert info.message.endswith(DEVELOPMENT_KEY_WARNING)
    # Trusted but unused (no licence file): still reported, so a development install is never mistaken.
    info = license_info(load_license(None, TEST_KEY_B64), "serving")
    assert (info.state, info.key_id, info.development_key) == (pb.LICENSE_STATE_COMMUNITY, "", True)


def test_get_license_needs_an_authenticated_caller_but_no_scope() -> None:
    assert LICENSE_METHOD_SCOPES == {"/gristmill.api.admin.v1.LicenseService/GetLicense": ""}
