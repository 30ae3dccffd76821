"""``python -m gristmill.registry``: the only place that reads the environment.

settings → logging → app → resume verifications left PENDING by the last run → serve until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

from gristmill.core.errors import ConfigurationError
from gristmill.core.logs import setup_logging
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings, load_settings
from gristmill.registry import SERVICE_NAME
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings

log = logging.getLogger(__name__)


def main() -> None:
    try:
        settings = load_settings(RegistrySettings)
        kafka = load_settings(KafkaSettings)
        s3 = load_settings(S3Settings)
        telemetry = load_settings(TelemetrySettings)
    except ConfigurationError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE_NAME, settings.log_level)
    try:
        app = build_app(settings, kafka=kafka, s3=s3, telemetry=telemetry)
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    # In the background so that a large PENDING copy does not delay serving; an interrupted one stays
    # PENDING and is resumed at the next start.
    threading.Thread(target=app.registry.resume_pending, name="resume-verifications", daemon=True).start()
    asyncio.run(app.host.run_until_signal())


if __name__ == "__main__":
    main()
