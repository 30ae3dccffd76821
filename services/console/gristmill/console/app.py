"""Wiring: the console's ASGI app on an ``HttpServer``, its service channels, its session codec."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gristmill.console.api.pages import console_app
from gristmill.console.domain.sessions import SessionCodec
from gristmill.console.gateway import Services
from gristmill.console.settings import ConsoleSettings
from gristmill.core.httpserver import HttpServer
from gristmill.core.tls import TlsSettings

log = logging.getLogger(__name__)


@dataclass
class ConsoleApp:
    """The console as one component: ``open`` binds its port and serves, ``close`` drains and closes channels."""

    server: HttpServer
    services: Services
    name: str = "console"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    async def open(self) -> None:
        await self.server.open()

    async def close(self) -> None:
        self.services.begin_close()
        await self.server.close()
        await self.services.close()


def build_app(settings: ConsoleSettings, tls: TlsSettings | None = None) -> ConsoleApp:
    """``tls``: the console's certificate for its calls to the services (the pages themselves are plain HTTP: put a
    TLS-terminating proxy in front of them, with ``secure_cookies``)."""
    addresses = {
        "labeling": settings.labeling_address,
        "admin": settings.admin_address,
        "training": settings.training_address,
        "registry": settings.registry_address,
        "serving": settings.serving_address,
    }
    services = Services(addresses, timeout_s=settings.call_timeout_s, tls=tls)
    secret = settings.session_secret.get_secret_value()
    if not secret:
        log.warning("GRISTMILL_CONSOLE_SESSION_SECRET is not set: sessions end when this process stops")
    codec = SessionCodec(secret, settings.session_max_age_s)
    app = console_app(services, codec, secure_cookies=settings.secure_cookies)
    server = HttpServer(
        app,
        name="console-http",
        what="the console",
        host=settings.host,
        port=settings.http_port,
        grace_s=settings.shutdown_grace_s,
    )
    return ConsoleApp(server, services)
