"""``Security.close`` closes what a networked service opened towards the admin service: the key verifier's
channel and every quota guard's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gristmill.core.auth import AuthSettings
from gristmill.core.auth_quota import UsageKind
from gristmill.core.events.topics import platform_catalog
from gristmill.core.licensing import load_license
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.sql import Database

# Nothing listens here: the point is only whether a call is still attempted.
NOWHERE = "127.0.0.1:1"
KEY = "gm_" + "a" * 40


def test_close_closes_the_verifier_and_every_quota_guard(tmp_path: Path) -> None:
    hook = build_auth_hook(AuthSettings(admin_address=NOWHERE), method_scopes={}, embedded=False)
    security = Security(auth_hook=hook, license=load_license(None, ""), service_key=KEY, admin_address=NOWHERE)
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    database.create_all()
    guards = [security.quota_guard(database, platform_catalog(), "serving") for _ in range(2)]
    security.close()
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    for guard in guards:
        assert guard is not None
        with pytest.raises(ValueError, match="closed channel"):
            guard.plans.plan_for("acme")
        with pytest.raises(ValueError, match="closed channel"):
            guard.usage.used("acme", UsageKind.PREDICTIONS, yesterday, now)
    with pytest.raises(ValueError, match="closed channel"):
        hook._verifier.verify(KEY)  # type: ignore[attr-defined]
    security.close()  # twice is fine
