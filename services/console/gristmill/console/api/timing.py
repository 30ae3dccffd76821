"""``Server-Timing`` on every console response: the time the console spent on it and on each service call.

Browsers show the header in their developer tools next to the request (and expose it to the page as
``PerformanceResourceTiming.serverTiming``), so an operator, or the console benchmark, can tell a slow page's
service call from the console's own rendering and from the browser's work without a profiler.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The calls of the request being handled: (service.Method, milliseconds). A ContextVar because each request runs in
# its own task, and the gateway records into whatever request it is serving.
_calls: ContextVar[list[tuple[str, float]] | None] = ContextVar("console_calls", default=None)


def record_call(name: str, elapsed_ms: float) -> None:
    """Counts one service call (``labeling.NextTask``) in the ``Server-Timing`` of the request that made it."""
    calls = _calls.get()
    if calls is not None:
        calls.append((name, elapsed_ms))


def server_timing(calls: list[tuple[str, float]], total_ms: float) -> str:
    """The header's value: one metric per call (its name with the dot as a dash, as the syntax asks for a token),
    then ``app``, the whole time until the response started."""
    parts = [f"{name.replace('.', '-')};dur={ms:.1f}" for name, ms in calls]
    return ", ".join([*parts, f"app;dur={total_ms:.1f}"])


class ServerTiming:
    """Pure ASGI middleware (not ``BaseHTTPMiddleware``: that would buffer event streams and add a task hop)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        calls: list[tuple[str, float]] = []
        token = _calls.set(calls)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                total_ms = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", server_timing(calls, total_ms).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            _calls.reset(token)
