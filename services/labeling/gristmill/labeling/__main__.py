"""``python -m gristmill.labeling``: the only place that reads the environment."""

from __future__ import annotations

import asyncio
import sys

from gristmill.core.errors import ConfigurationError
from gristmill.core.logs import setup_logging
from gristmill.core.security import load_security
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings, load_settings
from gristmill.labeling.app import METHOD_SCOPES, SERVICE, build_host
from gristmill.labeling.settings import LabelingSettings


def main() -> None:
    try:
        settings = load_settings(LabelingSettings)
        kafka = load_settings(KafkaSettings)
        s3 = load_settings(S3Settings)
        telemetry = load_settings(TelemetrySettings)
    except ConfigurationError as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(SERVICE, settings.log_level)
    try:
        security = load_security(SERVICE, METHOD_SCOPES, embedded=not kafka.bootstrap_servers)
    except ConfigurationError as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        host = build_host(settings, kafka=kafka, s3=s3, security=security, telemetry=telemetry)
    except ConfigurationError as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(host.run_until_signal())
    finally:
        security.close()


if __name__ == "__main__":
    main()
