"""``python -m gristmill.console``: the console's web pages until SIGTERM/SIGINT (the only place that reads the
environment)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from gristmill.console import SERVICE_NAME
from gristmill.console.app import build_app
from gristmill.console.settings import ConsoleSettings
from gristmill.core.errors import GristmillError
from gristmill.core.logs import setup_logging
from gristmill.core.settings import load_settings
from gristmill.core.tls import TlsSettings, channel_credentials

log = logging.getLogger("gristmill.console")


async def _serve(settings: ConsoleSettings, tls: TlsSettings | None) -> None:
    app = build_app(settings, tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.open()
    try:
        await stop.wait()
    finally:
        await app.close()
        log.info("%s stopped", SERVICE_NAME)


def main() -> int:
    try:
        settings = load_settings(ConsoleSettings)
        tls = load_settings(TlsSettings)
        channel_credentials(tls)  # unreadable certificate files fail here, at start
    except GristmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(SERVICE_NAME, settings.log_level)
    try:
        asyncio.run(_serve(settings, tls if tls.enabled else None))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
