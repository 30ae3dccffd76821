"""``HttpServer``: a service host component that serves an ASGI app with uvicorn on the service's event loop.

Serving's OpenAI-compatible API and the console use it. The host owns the process's signals (uvicorn's own
handlers are off), so SIGTERM stops the HTTP server with every other component, in the host's order. Needs the
``http`` extra of gristmill-libs (uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import grpc
import uvicorn

from gristmill.core.errors import GristmillError
from gristmill.core.tls import TlsSettings

log = logging.getLogger(__name__)

_HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(error: GristmillError) -> int:
    """The HTTP status of an error's gRPC status (500 for anything unexpected)."""
    return _HTTP_STATUS.get(error.grpc_code, 500)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the service host owns SIGTERM/SIGINT (a graceful stop of
    every component, this one among them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def ssl_options(tls: TlsSettings | None) -> dict[str, Any]:
    """uvicorn's TLS options from the service's mTLS settings: the same certificate as its gRPC server, and
    client certificates required as there."""
    if tls is None or not tls.enabled:
        return {}
    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file) if tls.key_file else None,
        "ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_cert and tls.ca_file else ssl.CERT_NONE,
    }


def _bind(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise OSError(f"could not bind {what} to {host}:{port}: {exc.strerror or exc}") from exc


class HttpServer:
    """The host component serving ``app`` over HTTP: bound and accepting once ``open`` returned (``port`` is then
    the bound port, also when 0 was asked for); ``close`` stops accepting, lets replies in flight finish for
    ``grace_s`` (then cancels them) and returns. Safe to close twice. ``what`` names it in log lines and errors."""

    def __init__(
        self,
        app: Any,
        *,
        name: str,
        what: str,
        host: str,
        port: int,
        grace_s: float = 10.0,
        tls: TlsSettings | None = None,
    ) -> None:
        self.app = app
        self.name = name
        self.what = what
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            # The service configured logging already; uvicorn's default would replace its handlers.
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=math.ceil(grace_s),
            **ssl_options(tls),
        )
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> Literal["http", "https"]:
        return "https" if self._config.is_ssl else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    async def open(self) -> None:
        sock = _bind(self.host, self.port, self.what)
        self.port = int(sock.getsockname()[1])
        server = _EmbeddedServer(self._config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name=self.name)
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # raises what stopped it
                raise RuntimeError(f"{self.what} at {self.host}:{self.port} stopped before it started")
            await asyncio.sleep(0.01)
        self._server, self._task = server, task
        log.info("serving %s on %s", self.what, self.url)

    async def close(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        await task
