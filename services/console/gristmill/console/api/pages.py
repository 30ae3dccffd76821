"""The console's HTTP routes: thin, like the gRPC servicers. Read the form, call ``Desk``, render a template.

Every page is rendered on the server by Jinja2 with autoescaping on, so text that came from data (an item, a
project's name, a label) is shown as text. Scripts come only from ``/static`` (the Content-Security-Policy
allows nothing else, inline scripts included), so even a missed escape could not run one. Writes are POSTs that
carry the session's CSRF token. A request from htmx (the ``HX-Request`` header) gets the fragment it swaps in;
without JavaScript the same forms work with full pages (POST, then a 303 to the page).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gristmill.console.api import jobs, models
from gristmill.console.api.render import SECURITY_HEADERS, Pages
from gristmill.console.api.timing import ServerTiming
from gristmill.console.domain.desk import AgreementMatrix, Desk, TaskView, answer_from, chart_data
from gristmill.console.domain.sessions import COOKIE, Session, SessionCodec, annotator_id_from
from gristmill.console.gateway import Services
from gristmill.core.errors import GristmillError, InvalidArgumentError, UnauthenticatedError
from gristmill.core.httpserver import http_status

log = logging.getLogger(__name__)


def console_app(services: Services, codec: SessionCodec, *, secure_cookies: bool) -> FastAPI:
    """The console's ASGI app over ``services``, its sessions sealed by ``codec``."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ServerTiming)
    pages = Pages(codec, secure_cookies=secure_cookies)
    desk = Desk(services)
    static = Path(str(resources.files("gristmill.console") / "static"))
    app.mount("/static", StaticFiles(directory=static), name="static")
    session_of, page, see_other, is_htmx = pages.session_of, pages.page, pages.see_other, pages.is_htmx

    @app.exception_handler(GristmillError)
    async def gristmill_error(request: Request, error: GristmillError) -> Response:
        if isinstance(error, UnauthenticatedError) and request.method == "GET":
            return see_other("/sign-in")
        status = http_status(error)
        if is_htmx(request):
            # The fragment goes to the page's notice, not in place of what the request targeted (the item stays).
            response = page(request, "_error.html", status=status, message=error.message)
            response.headers["hx-retarget"] = "#notice"
            response.headers["hx-reswap"] = "innerHTML"
            return response
        return page(request, "error.html", status=status, message=error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = "no such page" if error.status_code == 404 else str(error.detail)
        return page(request, "error.html", status=error.status_code, message=message)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/sign-in")
    async def sign_in_form(request: Request) -> Response:
        return page(request, "sign_in.html")

    @app.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await request.form()
        api_key = str(form.get("api_key", "")).strip()
        who = await services.who_am_i(api_key)
        if not api_key and not who.auth_disabled:
            raise UnauthenticatedError("enter your API key (a key's secret starts with gmk_)")
        session = Session(
            api_key=api_key,
            annotator_id=annotator_id_from(str(form.get("annotator", "")), who.api_key_id or "annotator"),
            organization_id=who.organization_id,
            api_key_id=who.api_key_id,
            scopes=tuple(who.scopes),
            auth_disabled=who.auth_disabled,
        )
        response = see_other("/")
        response.set_cookie(
            COOKIE,
            codec.seal(session),
            max_age=codec.max_age_s,
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
            path="/",
        )
        return response

    @app.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        session = session_of(request)
        if session is not None:
            session.check_csrf(str((await request.form()).get("csrf", "")))
        response = see_other("/sign-in")
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure_cookies)
        return response

    @app.get("/")
    async def projects(request: Request) -> Response:
        session = pages.require(request)
        return page(request, "projects.html", projects=await desk.projects(session))

    @app.get("/projects/{project_id}")
    async def project(request: Request, project_id: str) -> Response:
        session = pages.require(request)
        view = await desk.project(session, project_id)
        agreement = await desk.agreement(session, project_id)
        versions = await desk.versions(session, project_id)
        return page(
            request,
            "project.html",
            view=view,
            agreement=agreement,
            matrix=AgreementMatrix.of(agreement),
            charts=chart_data(agreement, versions),
            versions=versions,
        )

    @app.post("/projects/{project_id}/publish")
    async def publish(request: Request, project_id: str) -> Response:
        session = pages.require(request)
        form = await pages.form(request, session)
        await desk.publish(session, project_id, form.get("description", ""))
        return see_other(f"/projects/{project_id}")

    @app.get("/projects/{project_id}/review")
    async def review_page(request: Request, project_id: str) -> Response:
        session = pages.require(request)
        view = await desk.project(session, project_id)
        return page(request, "review.html", view=view, conflicts=await desk.conflicts(session, view))

    @app.post("/projects/{project_id}/review")
    async def review(request: Request, project_id: str) -> Response:
        session = pages.require(request)
        form = await pages.form(request, session)
        await desk.resolve(session, project_id, form.get("item_id", ""), form.get("label", ""))
        return see_other(f"/projects/{project_id}/review")

    @app.get("/projects/{project_id}/label")
    async def label_page(request: Request, project_id: str) -> Response:
        session = pages.require(request)
        view = await desk.project(session, project_id)
        task = await desk.next_task(session, project_id, project=view)
        return page(request, "label.html", view=view, task=task, last=None)

    @app.post("/projects/{project_id}/label")
    async def label(request: Request, project_id: str) -> Response:
        session = pages.require(request)
        form = await pages.form(request, session)
        action = form.get("action", "submit")
        last: dict[str, str] | None = None
        task: TaskView | None
        if action == "submit":
            answer = answer_from(form, form.all("flags"))
            annotation_id = await desk.submit(
                session, project_id, form.get("task_id", ""), form.get("item_id", ""), answer
            )
            last = {"item_id": form.get("item_id", ""), "annotation_id": annotation_id}
            task = await desk.next_task(session, project_id)
        elif action == "skip":
            await desk.skip(session, project_id, form.get("task_id", ""))
            task = await desk.next_task(session, project_id)
        elif action == "undo":
            task = await desk.revisit(
                session, project_id, form.get("last_item_id", ""), form.get("last_annotation_id", "")
            )
        elif action == "renew":
            await desk.renew(session, project_id, form.get("task_id", ""))
            return Response(status_code=204, headers=SECURITY_HEADERS)
        elif action == "change":
            answer = answer_from(form, form.all("flags"))
            await desk.change(session, project_id, form.get("annotation_id", ""), answer)
            task = await desk.next_task(session, project_id)
        else:
            raise InvalidArgumentError(f"unknown action {action!r}: submit, skip, undo, change or renew")
        if is_htmx(request):
            return page(request, "_task.html", project_id=project_id, task=task, last=last, fragment=True)
        if action == "undo":  # without JavaScript: the whole page, showing the item to change
            return page(request, "label.html", view=await desk.project(session, project_id), task=task, last=None)
        return see_other(f"/projects/{project_id}/label")

    jobs.add_routes(app, pages, services)
    models.add_routes(app, pages, services)
    return app
