"""``python -m gristmill.serving``: the only place that reads the environment."""

from __future__ import annotations

import asyncio
import sys

from gristmill.core.errors import ConfigurationError
from gristmill.core.logs import setup_logging
from gristmill.core.security import load_security
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings, load_settings
from gristmill.serving.app import METHOD_SCOPES, PUBLIC_METHODS, SERVICE, build_host
from gristmill.serving.settings import ServingSettings


def main() -> None:
    try:
        settings = load_settings(ServingSettings)
        kafka = load_settings(KafkaSettings)
        s3 = load_settings(S3Settings)
        telemetry = load_settings(TelemetrySettings)
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    setup_logging(SERVICE, settings.log_level)
    from gristmill.serving.runtime.classifier import configure_torch

    configure_torch(settings.torch_threads)
    try:
        security = load_security(SERVICE, METHOD_SCOPES, embedded=not kafka.bootstrap_servers, public=PUBLIC_METHODS)
    except ConfigurationError as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        host = build_host(settings, kafka=kafka, s3=s3, security=security, telemetry=telemetry)
    except ConfigurationError as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(host.run_until_signal())
    finally:
        security.close()


if __name__ == "__main__":
    main()
