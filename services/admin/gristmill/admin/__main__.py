"""``python -m gristmill.admin``: the only place that reads the environment.

settings → logging → licence → app → first-start bootstrap (root organisation, first admin key) → serve
until SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys

from gristmill.admin import SERVICE_NAME
from gristmill.admin.app import build_app
from gristmill.admin.settings import AdminSettings
from gristmill.core.auth import AuthSettings
from gristmill.core.errors import ConfigurationError
from gristmill.core.licensing import load_license, reload_license
from gristmill.core.logs import setup_logging
from gristmill.core.settings import KafkaSettings, LicenseSettings, TelemetrySettings, load_settings
from gristmill.core.tls import TlsSettings, server_credentials

log = logging.getLogger(__name__)


def main() -> None:
    try:
        settings = load_settings(AdminSettings)
        kafka = load_settings(KafkaSettings)
        telemetry = load_settings(TelemetrySettings)
        auth = load_settings(AuthSettings)
        licence = load_settings(LicenseSettings)
        tls = load_settings(TlsSettings)
    except ConfigurationError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE_NAME, settings.log_level)
    try:
        license_ = load_license(licence.file, licence.public_key)
        app = build_app(
            settings,
            kafka=kafka,
            auth=auth,
            license_=license_,
            telemetry=telemetry,
            server_credentials=server_credentials(tls),
        )
        app.bootstrap()
        # SIGHUP: adopt a renewed licence file (a bad one keeps the running licence).
        app.host.on_reload = functools.partial(reload_license, license_, licence.file, licence.public_key)
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    asyncio.run(app.host.run_until_signal())


if __name__ == "__main__":
    main()
