"""Licence files: genuine, tampered (claims, signature, key id), signed with keys the release does not trust,
the packaged vendor key ring, the development key mode, expiry with an injected clock, limits."""

from __future__ import annotations

import base64
import json
import logging
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gristmill.core.errors import ConfigurationError, FailedPreconditionError
from gristmill.core.licensing import (
    COMMUNITY_LIMITS,
    DEVELOPMENT_KEY_ID,
    DEVELOPMENT_KEY_WARNING,
    KEY_RING_FORMAT,
    KEY_RING_RESOURCE,
    LICENSE_FORMAT,
    KeyRing,
    License,
    LicenseClaims,
    LicenseState,
    TrustedKey,
    generate_keypair,
    load_license,
    load_private_key,
    parse_public_key,
    public_key_b64,
    reload_license,
    sign_license,
    vendor_key_ring,
)
from gristmill.core.security import load_security
from gristmill.vendor.license_cli import main as license_cli

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 1, tzinfo=UTC)
RING_KEY_ID = "test-2026-1"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, str]:
    """A vendor key pair for these tests (private PEM, public base64): in ``ring``, never in the packaged one."""
    return generate_keypair()


@pytest.fixture(scope="module")
def ring(keys: tuple[bytes, str]) -> KeyRing:
    return KeyRing.of({RING_KEY_ID: parse_public_key(keys[1])})


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


def _write(
    tmp_path: Path, private_pem: bytes, claims: LicenseClaims | None = None, *, key_id: str = RING_KEY_ID
) -> Path:
    path = tmp_path / "acme.license"
    path.write_bytes(sign_license(claims or _claims(), load_private_key(private_pem), key_id))
    return path


# --------------------------------------------------------------------------- genuine and tampered


def test_genuine_licence_enables_its_features_and_limits(
    tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing
) -> None:
    license_ = load_license(_write(tmp_path, keys[0]), ring=ring, clock=Clock(T0 + timedelta(days=1)))
    assert license_.state() is LicenseState.VALID
    assert license_.claims is not None and license_.claims.key_id == RING_KEY_ID
    assert not license_.development_key
    license_.require_feature("serving.canary")
    with pytest.raises(FailedPreconditionError, match="labeling.active_learning is not included in licence lic-1"):
        license_.require_feature("labeling.active_learning")
    assert license_.limit("max_registered_models") == 3


def test_the_key_id_is_inside_the_signed_claims(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    doc = json.loads(_write(tmp_path, keys[0]).read_bytes())
    assert doc["format"] == LICENSE_FORMAT == "gristmill.license.v2"
    assert doc["claims"]["key_id"] == RING_KEY_ID and "key_id" not in doc


def test_one_byte_changed_in_the_claims_is_refused(tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing) -> None:
    path = _write(tmp_path, keys[0])
    path.write_bytes(path.read_bytes().replace(b'"max_registered_models": 3', b'"max_registered_models": 9'))
    with pytest.raises(ConfigurationError, match="licence lic-1 is not genuine"):
        load_license(path, ring=ring)


def test_one_byte_changed_in_the_signature_is_refused(tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing) -> None:
    path = _write(tmp_path, keys[0])
    doc = json.loads(path.read_bytes())
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="not genuine: its signature does not match"):
        load_license(path, ring=ring)


def test_a_swapped_key_id_is_refused(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    # Both keys trusted: a licence signed with one cannot be relabelled as the other's.
    other_private, other_public = generate_keypair()
    both = KeyRing.of({RING_KEY_ID: parse_public_key(keys[1]), "test-2026-2": parse_public_key(other_public)})
    path = _write(tmp_path, other_private, key_id="test-2026-2")
    path.write_text(path.read_text().replace('"test-2026-2"', f'"{RING_KEY_ID}"'))
    with pytest.raises(ConfigurationError, match=f"not genuine: .*not signed by vendor key '{RING_KEY_ID}'"):
        load_license(path, ring=both)


def test_a_licence_naming_a_ring_key_but_signed_by_another_is_refused(
    tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing
) -> None:
    other_private, _ = generate_keypair()
    path = _write(tmp_path, other_private)
    with pytest.raises(ConfigurationError, match="not signed by vendor key 'test-2026-1'"):
        load_license(path, ring=ring)


def test_an_unknown_key_id_is_refused_naming_the_trusted_ones(
    tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing
) -> None:
    path = _write(tmp_path, keys[0], key_id="acme-own")
    with pytest.raises(ConfigurationError) as refused:
        load_license(path, ring=ring)
    assert str(refused.value) == (
        "licence lic-1 is signed with key 'acme-own', which this release does not trust; "
        "ask your vendor for a licence signed with one of: 'test-2026-1'"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{oops", "not valid JSON"),
        (b'{"format": "x"}', "not a gristmill.license.v2"),
        (b"\xff", "not valid JSON"),
        (b'{"format": "gristmill.license.v2", "claims": {}, "signature": ""}', "claims are malformed"),
        (
            b'{"format": "gristmill.license.v2", "signature": "", "claims": {"key_id": "a\\nb", "license_id": "l"}}',
            "claims are malformed: key_id must name the signing key",
        ),
    ],
)
def test_malformed_licence_files_are_refused(tmp_path: Path, ring: KeyRing, content: bytes, message: str) -> None:
    path = tmp_path / "bad.license"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message):
        load_license(path, ring=ring)


def test_a_v1_licence_names_no_key_and_is_refused_asking_for_a_reissue(
    tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing
) -> None:
    # What the previous release wrote: no key_id, verified with whatever key the operator configured.
    claims = json.loads(_claims().canonical())
    del claims["key_id"]
    signature = load_private_key(keys[0]).sign(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    path = tmp_path / "old.license"
    doc = {"format": "gristmill.license.v1", "claims": claims, "signature": base64.b64encode(signature).decode()}
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match=r"v1 licence, which names no vendor key .* one of: 'test-2026-1'"):
        load_license(path, ring=ring)


def test_a_missing_file_is_clear(tmp_path: Path, ring: KeyRing) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_license(tmp_path / "none.license", ring=ring)


# --------------------------------------------------------------------------- the packaged vendor key ring


def test_the_default_install_refuses_a_licence_signed_with_a_key_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a customer can do with the public tooling: make a key pair and sign their own licence.
    own_private, _ = generate_keypair()
    trusted = ", ".join(f"'{k.key_id}'" for k in vendor_key_ring().keys)
    path = _write(tmp_path, own_private, key_id="acme-own")
    with pytest.raises(ConfigurationError) as refused:
        load_license(path)
    assert str(refused.value) == (
        f"licence lic-1 is signed with key 'acme-own', which this release does not trust; "
        f"ask your vendor for a licence signed with one of: {trusted}"
    )
    # Naming a vendor key id instead does not help: the signature is checked with the vendor's key.
    vendor_id = vendor_key_ring().keys[0].key_id
    with pytest.raises(ConfigurationError, match=f"not genuine: .*not signed by vendor key '{vendor_id}'"):
        load_license(_write(tmp_path, own_private, key_id=vendor_id))
    # And no development key is trusted unless one is set.
    with pytest.raises(ConfigurationError, match="signed with key 'development', which this release does not trust"):
        load_license(_write(tmp_path, own_private, key_id=DEVELOPMENT_KEY_ID))
    assert DEVELOPMENT_KEY_WARNING not in caplog.text


def test_the_packaged_key_ring_loads_with_well_formed_vendor_keys() -> None:
    ring = vendor_key_ring()
    assert len(ring.keys) >= 1
    assert not ring.has_development_key
    for key in ring.keys:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", key.key_id) and key.key_id != DEVELOPMENT_KEY_ID
        assert len(base64.b64decode(public_key_b64(key.public_key))) == 32
    # The file in the source tree is the one that ships: strict JSON, one entry per key.
    source = REPO_ROOT / "libs" / "gristmill" / "core" / KEY_RING_RESOURCE
    doc = json.loads(source.read_text())
    assert doc["format"] == KEY_RING_FORMAT
    assert [entry["key_id"] for entry in doc["keys"]] == [key.key_id for key in ring.keys]


def test_the_key_ring_is_package_data_of_the_built_library() -> None:
    # A wheel (the Docker images install one) carries only the data files pyproject names.
    pyproject = tomllib.loads((REPO_ROOT / "libs" / "pyproject.toml").read_text())
    assert KEY_RING_RESOURCE in pyproject["tool"]["setuptools"]["package-data"]["gristmill.core"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "has no 'keys'"),
        ([{"key_id": "a-1", "public_key": "AAAA"}], "public_key of 'a-1' must be base64 of 32 raw Ed25519 bytes"),
        ([{"key_id": "a-1", "public_key": "{key}", "not_afer": "2027-01-01T00:00:00Z"}], "unknown fields"),
        ([{"key_id": "a-1", "public_key": "{key}"}, {"key_id": "a-1", "public_key": "{key}"}], "more than once"),
        ([{"key_id": "development", "public_key": "{key}"}], "reserved key id 'development'"),
        ([{"key_id": "Has Spaces", "public_key": "{key}"}], "must be lower-case letters"),
        ([{"public_key": "{key}"}], "malformed: 'key_id'"),
    ],
)
def test_malformed_key_rings_are_refused(keys: tuple[bytes, str], entries: list[dict[str, str]], message: str) -> None:
    for entry in entries:
        entry["public_key"] = entry["public_key"].replace("{key}", keys[1])
    data = json.dumps({"format": KEY_RING_FORMAT, "keys": entries}).encode()
    with pytest.raises(ConfigurationError, match=message):
        KeyRing.from_json(data, source="test.json")


def test_a_retired_key_verifies_licences_issued_before_its_end_only(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    new_private, new_public = generate_keypair()
    entries = [
        {"key_id": RING_KEY_ID, "public_key": keys[1], "not_after": "2026-11-15T00:00:00Z"},
        {"key_id": "test-2026-2", "public_key": new_public},
    ]
    ring = KeyRing.from_json(json.dumps({"format": KEY_RING_FORMAT, "keys": entries}).encode(), source="t")
    assert ring.keys[0] == TrustedKey(RING_KEY_ID, ring.keys[0].public_key, datetime(2026, 11, 15, tzinfo=UTC))
    clock = Clock(T0 + timedelta(days=20))
    assert load_license(_write(tmp_path, keys[0]), ring=ring, clock=clock).state() is LicenseState.VALID
    late = _write(tmp_path, keys[0], _claims(issued_at=T0 + timedelta(days=15)))
    with pytest.raises(ConfigurationError) as refused:
        load_license(late, ring=ring, clock=clock)
    assert str(refused.value) == (
        "licence lic-1 was issued on 2026-11-16T00:00:00Z with key 'test-2026-1', retired for licences issued after "
        "2026-11-15T00:00:00Z; ask your vendor for a licence signed with one of: 'test-2026-2'"
    )
    renewed = _write(tmp_path, new_private, _claims(issued_at=T0 + timedelta(days=15)), key_id="test-2026-2")
    assert load_license(renewed, ring=ring, clock=clock).state() is LicenseState.VALID


# --------------------------------------------------------------------------- the development key mode


def test_a_development_key_is_trusted_only_when_set_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev_private, dev_public = generate_keypair()
    path = _write(tmp_path, dev_private, key_id=DEVELOPMENT_KEY_ID)
    with pytest.raises(ConfigurationError, match="signed with key 'development', which this release does not trust"):
        load_license(path, clock=Clock(T0))
    caplog.set_level(logging.INFO)
    license_ = load_license(path, dev_public, clock=Clock(T0))
    assert license_.state() is LicenseState.VALID and license_.development_key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert DEVELOPMENT_KEY_WARNING in warnings
    assert DEVELOPMENT_KEY_WARNING == (
        "development licence key in use (GRISTMILL_LICENSE_DEVELOPMENT_KEY): licences signed by it are trusted; "
        "never set this in production"
    )
    assert license_.describe().endswith(DEVELOPMENT_KEY_WARNING)


def test_a_development_key_does_not_stand_in_for_a_vendor_key(tmp_path: Path) -> None:
    dev_private, dev_public = generate_keypair()
    vendor_id = vendor_key_ring().keys[0].key_id
    path = _write(tmp_path, dev_private, key_id=vendor_id)
    with pytest.raises(ConfigurationError, match=f"not signed by vendor key '{vendor_id}'"):
        load_license(path, dev_public)


def test_a_development_key_without_a_licence_file_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    _, dev_public = generate_keypair()
    license_ = load_license(None, dev_public)
    assert license_.state() is LicenseState.COMMUNITY and license_.development_key
    assert DEVELOPMENT_KEY_WARNING in caplog.text
    with pytest.raises(ConfigurationError, match="GRISTMILL_LICENSE_DEVELOPMENT_KEY must be base64 of 32 raw"):
        load_license(None, "not-a-key")


@pytest.fixture
def licence_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("FILE", "PUBLIC_KEY", "DEVELOPMENT_KEY"):
        monkeypatch.delenv(f"GRISTMILL_LICENSE_{name}", raising=False)
    for name in ("CERT_FILE", "KEY_FILE", "CA_FILE"):
        monkeypatch.delenv(f"GRISTMILL_TLS_{name}", raising=False)
    return monkeypatch


def test_the_old_public_key_setting_stops_the_service_with_what_to_do(
    tmp_path: Path, keys: tuple[bytes, str], licence_environment: pytest.MonkeyPatch
) -> None:
    licence_environment.setenv("GRISTMILL_LICENSE_FILE", str(_write(tmp_path, keys[0])))
    licence_environment.setenv("GRISTMILL_LICENSE_PUBLIC_KEY", keys[1])
    expected = (
        "GRISTMILL_LICENSE_PUBLIC_KEY is no longer read: licences are verified with the vendor keys this release "
        "ships with; remove it (to trust a key of your own for development, set GRISTMILL_LICENSE_DEVELOPMENT_KEY "
        "instead, which every service reports loudly)"
    )
    with pytest.raises(ConfigurationError) as refused:
        load_security("registry", {}, embedded=True, local_keys=True)
    assert str(refused.value) == expected
    # Not even beside the development key: the old name never trusts anything.
    licence_environment.setenv("GRISTMILL_LICENSE_DEVELOPMENT_KEY", keys[1])
    with pytest.raises(ConfigurationError, match="GRISTMILL_LICENSE_PUBLIC_KEY is no longer read"):
        load_security("registry", {}, embedded=True, local_keys=True)


def test_a_service_trusts_the_development_key_from_its_setting_and_keeps_it_on_reload(
    tmp_path: Path, licence_environment: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dev_private, dev_public = generate_keypair()
    path = _write(
        tmp_path, dev_private, _claims(expires_at=datetime.now(UTC) + timedelta(days=30)), key_id="development"
    )
    licence_environment.setenv("GRISTMILL_LICENSE_FILE", str(path))
    with pytest.raises(ConfigurationError, match="signed with key 'development', which this release does not trust"):
        load_security("registry", {}, embedded=True, local_keys=True)
    licence_environment.setenv("GRISTMILL_LICENSE_DEVELOPMENT_KEY", dev_public)
    security = load_security("registry", {}, embedded=True, local_keys=True)
    assert security.license.development_key and security.license.has_feature("serving.canary")
    assert DEVELOPMENT_KEY_WARNING in caplog.text
    _write(
        tmp_path,
        dev_private,
        _claims(license_id="lic-2", expires_at=datetime.now(UTC) + timedelta(days=60)),
        key_id="development",
    )
    assert security.reload()
    assert security.license.claims is not None and security.license.claims.license_id == "lic-2"
    assert security.license.development_key


# --------------------------------------------------------------------------- expiry, limits, reload


def test_expiry_grace_then_features_stop(
    tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(T0 + timedelta(days=31))
    license_ = load_license(_write(tmp_path, keys[0]), ring=ring, clock=clock)
    assert license_.state() is LicenseState.GRACE
    license_.require_feature("serving.canary")  # still works during the grace period…
    assert "licensed features stop after 2026-12-08" in caplog.text  # …with a warning
    clock.now = T0 + timedelta(days=38)
    assert license_.state() is LicenseState.EXPIRED
    with pytest.raises(FailedPreconditionError, match="licence lic-1 expired on 2026-12-01"):
        license_.require_feature("serving.canary")
    assert license_.limit("max_registered_models") == COMMUNITY_LIMITS["max_registered_models"]


def test_limits_refuse_one_more_than_licensed(tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing) -> None:
    license_ = load_license(_write(tmp_path, keys[0]), ring=ring, clock=Clock(T0))
    license_.check_limit("max_registered_models", 3)
    with pytest.raises(
        FailedPreconditionError, match="max_registered_models is 3 under licence lic-1; this would make it 4"
    ):
        license_.check_limit("max_registered_models", 4)


def test_community_edition_without_a_file() -> None:
    license_ = load_license(None)
    assert license_.state() is LicenseState.COMMUNITY and not license_.development_key
    with pytest.raises(FailedPreconditionError, match="needs an enterprise licence"):
        license_.require_feature("serving.canary")
    assert License().limit("max_serving_models") == COMMUNITY_LIMITS["max_serving_models"]


def test_a_reload_changes_the_licence_every_holder_sees_and_a_bad_file_changes_nothing(
    tmp_path: Path, keys: tuple[bytes, str], ring: KeyRing
) -> None:
    clock = Clock(T0 + timedelta(days=1))
    path = _write(tmp_path, keys[0], _claims(limits={"max_registered_models": 3}))
    running = load_license(path, ring=ring, clock=clock)
    holder = running  # what a service's domain object keeps
    _write(tmp_path, keys[0], _claims(license_id="lic-2", limits={"max_registered_models": 50}))
    assert reload_license(running, path, ring=ring)
    assert holder.limit("max_registered_models") == 50 and holder.claims is not None
    assert holder.claims.license_id == "lic-2"
    path.write_bytes(path.read_bytes().replace(b"Acme", b"Acmf"))  # tampered
    assert not reload_license(running, path, ring=ring)
    _write(tmp_path, keys[0], _claims(license_id="lic-3"), key_id="acme-own")  # a key the ring lacks
    assert not reload_license(running, path, ring=ring)
    assert holder.limit("max_registered_models") == 50


# --------------------------------------------------------------------------- the vendor tool


def test_vendor_cli_round_trip_with_a_development_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert license_cli(["keygen", "--out-dir", str(tmp_path / "keys"), "--key-id", "dev-1"]) == 0
    assert '"key_id": "dev-1"' in capsys.readouterr().out  # the ring entry to add, for a vendor key
    public = (tmp_path / "keys" / "public.b64").read_text().strip()
    out = tmp_path / "acme.license"
    args = ["issue", "--key", str(tmp_path / "keys" / "private.pem"), "--key-id", "development"]
    args += ["--customer", "Acme", "--days", "10", "--feature", "serving.canary", "--limit", "max_serving_models=4"]
    assert license_cli([*args, "--out", str(out)]) == 0
    assert "with key 'development'" in capsys.readouterr().out
    assert license_cli(["verify", str(out)]) == 2  # the release's ring alone does not trust it
    assert "signed with key 'development', which this release does not trust" in capsys.readouterr().err
    assert license_cli(["verify", str(out), "--development-key", public]) == 0
    assert "valid: licence lic-" in capsys.readouterr().out
    assert license_cli(["inspect", str(out)]) == 0
    inspected = capsys.readouterr().out
    assert '"max_serving_models": 4' in inspected and '"key_id": "development"' in inspected
    assert (
        license_cli(
            ["issue", "--key", str(tmp_path / "nope.pem"), "--key-id", "x", "--customer", "x", "--out", str(out)]
        )
        == 2
    )
    assert "gristmill-license:" in capsys.readouterr().err


def test_vendor_cli_refuses_to_label_a_key_with_another_keys_ring_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert license_cli(["keygen", "--out-dir", str(tmp_path)]) == 0
    key = str(tmp_path / "private.pem")
    vendor_id = vendor_key_ring().keys[0].key_id
    out = tmp_path / "x.license"
    assert license_cli(["issue", "--key", key, "--key-id", vendor_id, "--customer", "x", "--out", str(out)]) == 2
    assert f"--key is not the private half of ring key '{vendor_id}'" in capsys.readouterr().err
    assert not out.exists()
    # A key for the next release's ring may sign, with a note that this release will refuse the licence.
    assert license_cli(["issue", "--key", key, "--key-id", "next-1", "--customer", "x", "--out", str(out)]) == 0
    assert "key id 'next-1' is not in this release's key ring" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --key-id is required
        license_cli(["issue", "--key", key, "--customer", "x", "--out", str(out)])
