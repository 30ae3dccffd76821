"""What every page route needs: the signed-in session, CSRF-checked forms, templates rendered with the security
headers, redirects. One ``Pages`` per app, shared by the route modules (labeling, jobs, models)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from google.protobuf.timestamp_pb2 import Timestamp
from jinja2 import Environment, PackageLoader, select_autoescape

from gristmill.console.domain.sessions import COOKIE, Session, SessionCodec, require
from gristmill.core.chat import CHAT_FLAGS

SECURITY_HEADERS = {
    # Scripts and styles from this origin's /static only: no inline script, no other site.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("gristmill.console", "templates"),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["percent"] = lambda value: f"{100 * float(value):.0f}%"
    env.filters["timestamp"] = timestamp
    env.globals["chat_flags"] = CHAT_FLAGS
    return env


def timestamp(value: Timestamp) -> str:
    """A protobuf time as ``2026-12-03 22:54 UTC``; "" when unset."""
    if not value.seconds and not value.nanos:
        return ""
    return value.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")


class Form(dict[str, str]):
    """A form's fields (the last value of each), and ``all`` of a repeated one's (checkboxes)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields)
        self.lists: dict[str, list[str]] = {}

    def all(self, name: str) -> list[str]:
        return list(self.lists.get(name, []))


class Pages:
    """Sessions from the sealed cookie, and pages rendered by Jinja2 with autoescaping on."""

    def __init__(self, codec: SessionCodec, *, secure_cookies: bool) -> None:
        self.codec = codec
        self.secure_cookies = secure_cookies
        self.templates = _templates()

    def session_of(self, request: Request) -> Session | None:
        return self.codec.open(request.cookies.get(COOKIE))

    def require(self, request: Request) -> Session:
        """The signed-in session (UNAUTHENTICATED, which sends a GET to the sign-in page, without one)."""
        return require(self.session_of(request))

    async def form(self, request: Request, session: Session) -> Form:
        """A POST's form fields, once its CSRF token is checked against the session's."""
        data = await request.form()
        form = Form({key: str(value) for key, value in data.items()})
        for key, value in data.multi_items():
            form.lists.setdefault(key, []).append(str(value))
        session.check_csrf(form.get("csrf", ""))
        return form

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(
            session=self.session_of(request), request=request, **context
        )
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    @staticmethod
    def see_other(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)

    @staticmethod
    def is_htmx(request: Request) -> bool:
        return request.headers.get("hx-request") == "true"
