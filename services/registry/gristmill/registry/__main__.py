"""``python -m gristmill.registry``: the only place that reads the environment.

settings → logging → app → a thread that finishes verifications left PENDING → serve until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

from gristmill.core.errors import ConfigurationError
from gristmill.core.logs import setup_logging
from gristmill.core.security import load_security
from gristmill.core.settings import KafkaSettings, S3Settings, TelemetrySettings, load_settings
from gristmill.registry import SERVICE_NAME
from gristmill.registry.app import METHOD_SCOPES, build_app
from gristmill.registry.domain.registry import Registry
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
    stop = threading.Event()
    retry = threading.Thread(
        target=retry_pending_verifications,
        args=(app.registry, settings.verification_retry_s, settings.verification_stale_s, stop),
        name="retry-verifications",
        daemon=True,
    )
    retry.start()
    try:
        asyncio.run(app.host.run_until_signal())
    finally:
        stop.set()
        security.close()


def retry_pending_verifications(registry: Registry, interval_s: float, stale_s: float, stop: threading.Event) -> None:
    """Finish versions left PENDING: everything at start (the last run's), then stale ones periodically.

    In the background so that a large copy never delays serving; an interrupted one stays PENDING.
    """
    min_age = 0.0
    while not stop.is_set():
        try:
            finished = registry.resume_pending(min_age_s=min_age)
            if finished:
                log.info("finished the verification of %d PENDING version(s)", finished)
        except Exception:
            log.exception("retrying PENDING verifications failed; trying again in %.0fs", interval_s)
        min_age = stale_s
        stop.wait(interval_s)


if __name__ == "__main__":
    main()
