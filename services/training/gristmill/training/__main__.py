"""``python -m gristmill.training``: settings → logging → app → serve until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import sys

from gristmill.core.errors import ConfigurationError
from gristmill.core.logs import setup_logging
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings, load_settings
from gristmill.training import SERVICE_NAME
from gristmill.training.settings import TrainingSettings


def main() -> int:
    try:
        settings = load_settings(TrainingSettings)
        kafka = load_settings(KafkaSettings)
        s3 = load_settings(S3Settings)
        telemetry = load_settings(TelemetrySettings)
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    setup_logging(SERVICE_NAME, settings.log_level)
    # No model hub is reachable or needed: base models are local directories or object-store prefixes.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray's C++ failure-signal handler takes SIGTERM and aborts the process mid-shutdown; the service
    # handles SIGTERM itself (drain, then stop Ray).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from gristmill.core.security import load_security
    from gristmill.training.app import METHOD_SCOPES, build_host

    try:
        security = load_security(SERVICE_NAME, METHOD_SCOPES, embedded=not kafka.bootstrap_servers)
    except ConfigurationError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 2
    try:
        host = build_host(settings, kafka=kafka, s3=s3, security=security, telemetry=telemetry)
    except ConfigurationError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        security.close()
        return 2
    try:
        asyncio.run(host.run_until_signal())
    finally:
        security.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
