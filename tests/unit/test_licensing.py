"""Licence files: genuine, tampered (claims and signature), expired with an injected clock, limits."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gristmill.core.errors import ConfigurationError, FailedPreconditionError
from gristmill.core.licensing import (
    COMMUNITY_LIMITS,
    License,
    LicenseClaims,
    LicenseState,
    generate_keypair,
    load_license,
    load_private_key,
    reload_license,
    sign_license,
)
from gristmill.vendor.license_cli import main as license_cli

T0 = datetime(2026, 11, 1, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, str]:
    return generate_keypair()


def _claims(**overrides: object) -> LicenseClaims:
    values: dict[str, object] = {
        "license_id": "lic-1",
        "customer": "Acme",
        "issued_at": T0,
        "expires_at": T0 + timedelta(days=30),
        "features": frozenset({"serving.canary", "training.gpu"}),
        "limits": {"max_registered_models": 3},
        "grace_days": 7,
    }
    values.update(overrides)
    return LicenseClaims(**values)  # type: ignore[arg-type]


def _write(tmp_path: Path, keys: tuple[bytes, str], claims: LicenseClaims | None = None) -> Path:
    path = tmp_path / "acme.license"
    path.write_bytes(sign_license(claims or _claims(), load_private_key(keys[0])))
    return path


def test_genuine_licence_enables_its_features_and_limits(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    license_ = load_license(_write(tmp_path, keys), keys[1], clock=Clock(T0 + timedelta(days=1)))
    assert license_.state() is LicenseState.VALID
    license_.require_feature("serving.canary")
    with pytest.raises(FailedPreconditionError, match="labeling.active_learning is not included in licence lic-1"):
        license_.require_feature("labeling.active_learning")
    assert license_.limit("max_registered_models") == 3


def test_one_byte_changed_in_the_claims_is_refused(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    path = _write(tmp_path, keys)
    path.write_bytes(path.read_bytes().replace(b'"max_registered_models": 3', b'"max_registered_models": 9'))
    with pytest.raises(ConfigurationError, match="licence lic-1 is not genuine"):
        load_license(path, keys[1])


def test_one_byte_changed_in_the_signature_is_refused(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    path = _write(tmp_path, keys)
    doc = json.loads(path.read_bytes())
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="not genuine: its signature does not match"):
        load_license(path, keys[1])


def test_licence_signed_by_another_key_is_refused(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    other_private, _ = generate_keypair()
    path = _write(tmp_path, (other_private, keys[1]))
    with pytest.raises(ConfigurationError, match="signed by another vendor key"):
        load_license(path, keys[1])


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{oops", "not valid JSON"), (b'{"format": "x"}', "not a gristmill.license.v1"), (b"\xff", "not valid JSON")],
)
def test_malformed_licence_files_are_refused(
    tmp_path: Path, keys: tuple[bytes, str], content: bytes, message: str
) -> None:
    path = tmp_path / "bad.license"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message):
        load_license(path, keys[1])


def test_missing_file_and_missing_public_key_are_clear(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_license(tmp_path / "none.license", keys[1])
    with pytest.raises(ConfigurationError, match="GRISTMILL_LICENSE_PUBLIC_KEY is empty"):
        load_license(_write(tmp_path, keys), "")


def test_expiry_grace_then_features_stop(
    tmp_path: Path, keys: tuple[bytes, str], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(T0 + timedelta(days=31))
    license_ = load_license(_write(tmp_path, keys), keys[1], clock=clock)
    assert license_.state() is LicenseState.GRACE
    license_.require_feature("serving.canary")  # still works during the grace period…
    assert "licensed features stop after 2026-12-08" in caplog.text  # …with a warning
    clock.now = T0 + timedelta(days=38)
    assert license_.state() is LicenseState.EXPIRED
    with pytest.raises(FailedPreconditionError, match="licence lic-1 expired on 2026-12-01"):
        license_.require_feature("serving.canary")
    assert license_.limit("max_registered_models") == COMMUNITY_LIMITS["max_registered_models"]


def test_limits_refuse_one_more_than_licensed(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    license_ = load_license(_write(tmp_path, keys), keys[1], clock=Clock(T0))
    license_.check_limit("max_registered_models", 3)
    with pytest.raises(
        FailedPreconditionError, match="max_registered_models is 3 under licence lic-1; this would make it 4"
    ):
        license_.check_limit("max_registered_models", 4)


def test_community_edition_without_a_file() -> None:
    license_ = load_license(None, "")
    assert license_.state() is LicenseState.COMMUNITY
    with pytest.raises(FailedPreconditionError, match="needs an enterprise licence"):
        license_.require_feature("serving.canary")
    assert License().limit("max_serving_models") == COMMUNITY_LIMITS["max_serving_models"]


def test_vendor_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert license_cli(["keygen", "--out-dir", str(tmp_path / "keys")]) == 0
    public = (tmp_path / "keys" / "public.b64").read_text().strip()
    out = tmp_path / "acme.license"
    args = ["issue", "--key", str(tmp_path / "keys" / "private.pem"), "--customer", "Acme", "--days", "10"]
    args += ["--feature", "serving.canary", "--limit", "max_serving_models=4", "--out", str(out)]
    assert license_cli(args) == 0
    assert license_cli(["verify", str(out), "--public-key", public]) == 0
    assert "valid: licence lic-" in capsys.readouterr().out
    assert license_cli(["inspect", str(out)]) == 0
    assert '"max_serving_models": 4' in capsys.readouterr().out
    assert license_cli(["issue", "--key", str(tmp_path / "nope.pem"), "--customer", "x", "--out", str(out)]) == 2
    assert "gristmill-license:" in capsys.readouterr().err


def test_a_reload_changes_the_licence_every_holder_sees_and_a_bad_file_changes_nothing(
    tmp_path: Path, keys: tuple[bytes, str]
) -> None:
    clock = Clock(T0 + timedelta(days=1))
    path = _write(tmp_path, keys, _claims(limits={"max_registered_models": 3}))
    running = load_license(path, keys[1], clock=clock)
    holder = running  # what a service's domain object keeps
    _write(tmp_path, keys, _claims(license_id="lic-2", limits={"max_registered_models": 50}))
    assert reload_license(running, path, keys[1])
    assert holder.limit("max_registered_models") == 50 and holder.claims is not None
    assert holder.claims.license_id == "lic-2"
    path.write_bytes(path.read_bytes().replace(b"Acme", b"Acmf"))  # tampered
    assert not reload_license(running, path, keys[1])
    assert holder.limit("max_registered_models") == 50
