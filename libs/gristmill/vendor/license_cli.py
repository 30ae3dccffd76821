"""``gristmill-license``: create vendor keys, issue, inspect and verify licence files.

    gristmill-license keygen --out-dir keys/ --key-id gristmill-2027-1   # private.pem (keep it secret),
                                                                         # public.b64 and the key ring entry
    gristmill-license issue --key ~/.config/gristmill-vendor/gristmill-2026-1.key --key-id gristmill-2026-1 \\
        --customer "Acme" --days 365 --feature serving.canary --limit max_registered_models=50 --out acme.license
    gristmill-license inspect acme.license               # claims, without verifying
    gristmill-license verify acme.license                # against the key ring this release ships with
    gristmill-license verify dev.license --development-key "$(cat keys/public.b64)"

A licence names its key id in its signed claims; installs trust only the ids in the packaged key ring
(``gristmill/core/license_keys.json``), so a new key is added there before licences signed with it are sent
out. A key pair made here for development is trusted only under ``--key-id development`` by an install that sets
``GRISTMILL_LICENSE_DEVELOPMENT_KEY`` (which it reports loudly). Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from gristmill.core.errors import ConfigurationError, GristmillError
from gristmill.core.licensing import (
    DEVELOPMENT_KEY_ID,
    LicenseClaims,
    generate_keypair,
    load_private_key,
    public_key_b64,
    sign_license,
    vendor_key_ring,
    verify_license,
)
from gristmill.core.values import utc_now


def _limit(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"limit {text!r} must look like name=number")
    return name, int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gristmill-license", description="Issue and check Gristmill licences.")
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="create a vendor key pair")
    keygen.add_argument("--out-dir", type=Path, required=True)
    keygen.add_argument("--key-id", default="", help="print the key ring entry for this id")
    issue = sub.add_parser("issue", help="sign a licence file")
    issue.add_argument("--key", type=Path, required=True, help="vendor private key (PEM)")
    issue.add_argument(
        "--key-id",
        required=True,
        help=f"the key ring id of --key (written into the signed claims); '{DEVELOPMENT_KEY_ID}' for a development key",
    )
    issue.add_argument("--customer", required=True)
    issue.add_argument("--days", type=int, default=365, help="valid for this many days from now")
    issue.add_argument("--grace-days", type=int, default=14)
    issue.add_argument("--feature", action="append", default=[], help="licensed feature (repeatable)")
    issue.add_argument("--limit", action="append", type=_limit, default=[], help="name=number (repeatable)")
    issue.add_argument("--license-id", default="")
    issue.add_argument("--out", type=Path, required=True)
    inspect = sub.add_parser("inspect", help="print a licence's claims (no verification)")
    inspect.add_argument("file", type=Path)
    verify = sub.add_parser("verify", help="verify a licence against this release's key ring and print its state")
    verify.add_argument("file", type=Path)
    verify.add_argument("--development-key", default="", help="also trust this development public key (base64)")
    return parser


def _check_key_id(private_b64: str, key_id: str) -> None:
    """Refuse to sign under a ring id whose public key is not ``--key``'s: the licence would never verify."""
    ring_key = vendor_key_ring().find(key_id)
    if ring_key is None:
        if key_id != DEVELOPMENT_KEY_ID:
            # Allowed (a key for the next release's ring), but installs of this one will refuse the licence.
            print(f"gristmill-license: note: key id '{key_id}' is not in this release's key ring", file=sys.stderr)
        return
    if public_key_b64(ring_key.public_key) != private_b64:
        raise ConfigurationError(f"--key is not the private half of ring key '{key_id}'")


def run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        args.out_dir.mkdir(parents=True, exist_ok=True)
        pem, public = generate_keypair()
        private_path = args.out_dir / "private.pem"
        private_path.write_bytes(pem)
        private_path.chmod(0o600)
        (args.out_dir / "public.b64").write_text(public + "\n")
        print(f"wrote {private_path} (keep it secret) and {args.out_dir / 'public.b64'}")
        if args.key_id:
            print("key ring entry: " + json.dumps({"key_id": args.key_id, "public_key": public}))
    elif args.command == "issue":
        private_key = load_private_key(args.key.read_bytes())
        _check_key_id(public_key_b64(private_key.public_key()), args.key_id)
        now = utc_now().replace(microsecond=0)
        claims = LicenseClaims(
            license_id=args.license_id or f"lic-{uuid.uuid4().hex[:12]}",
            customer=args.customer,
            issued_at=now,
            expires_at=now + timedelta(days=args.days),
            features=frozenset(args.feature),
            limits=dict(args.limit),
            grace_days=args.grace_days,
        )
        args.out.write_bytes(sign_license(claims, private_key, args.key_id))
        print(f"issued licence {claims.license_id} for {claims.customer} with key '{args.key_id}' to {args.out}")
    elif args.command == "inspect":
        print(json.dumps(json.loads(args.file.read_bytes())["claims"], indent=2, sort_keys=True))
    else:
        ring = vendor_key_ring()
        if args.development_key:
            ring = ring.with_development_key(args.development_key)
        license_ = verify_license(args.file.read_bytes(), ring)
        print(f"{license_.state().value}: {license_.describe()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (GristmillError, OSError, KeyError, ValueError) as exc:
        print(f"gristmill-license: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
