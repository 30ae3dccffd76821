"""``python -m gristmill.registry``: the only place that reads the environment.

settings → logging → app → serve until SIGTERM (the host also finishes verifications left PENDING).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from gristmill.core.errors import ConfigurationError
from gristmill.core.logs import setup_logging
from gristmill.core.security import load_security
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings, load_settings
from gristmill.registry import SERVICE_NAME
from gristmill.registry.app import METHOD_SCOPES, build_app
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
        security = load_security(SERVICE_NAME, METHOD_SCOPES, embedded=not kafka.bootstrap_servers)
        app = build_app(settings, kafka=kafka, s3=s3, security=security, telemetry=telemetry)
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    try:
        asyncio.run(app.host.run_until_signal())
    finally:
        security.close()


if __name__ == "__main__":
    main()
