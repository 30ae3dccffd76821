"""Routes of the registry and serving pages (models, versions, deployments): each a GET that reads the session,
asks ``Registry`` and renders, and one POST that explains a text with a deployment. A service's error (NOT_FOUND
for another organisation's model, say) is the app's error page with its HTTP status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from gristmill.console.api.render import Pages
from gristmill.console.domain.models import Registry
from gristmill.console.gateway import Services


def add_routes(app: FastAPI, pages: Pages, services: Services) -> None:
    registry = Registry(services)

    @app.get("/models")
    async def models(request: Request) -> Response:
        session = pages.require(request)
        return pages.page(request, "models.html", models=await registry.models(session))

    @app.get("/models/{name}")
    async def model(request: Request, name: str) -> Response:
        session = pages.require(request)
        return pages.page(request, "model.html", view=await registry.model(session, name))

    @app.get("/models/{name}/versions/{version}")
    async def model_version(request: Request, name: str, version: str) -> Response:
        session = pages.require(request)
        return pages.page(request, "model_version.html", name=name, view=await registry.version(session, name, version))

    @app.get("/deployments")
    async def deployments(request: Request) -> Response:
        session = pages.require(request)
        return pages.page(request, "deployments.html", deployments=await registry.deployments(session))

    @app.post("/deployments/{name}/explain")
    async def explain(request: Request, name: str) -> Response:
        # A POST with the page's CSRF token: a prediction is metered and may be logged, so it is not a GET.
        session = pages.require(request)
        form = await pages.form(request, session)
        view = await registry.explain(session, name, form.get("text", ""))
        return pages.page(request, "_explanation.html" if pages.is_htmx(request) else "explanation.html", view=view)
