"""Routes of the training pages: the jobs list, a job's page, and its live events as Server-Sent Events (the
page's script draws the loss and metric curves from them with Chart.js)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from gristmill.console.api.render import SECURITY_HEADERS, Pages
from gristmill.console.domain.jobs import Trainers
from gristmill.console.domain.sessions import Session
from gristmill.console.gateway import Services
from gristmill.core.errors import GristmillError


def add_routes(app: FastAPI, pages: Pages, services: Services) -> None:
    trainers = Trainers(services)

    @app.get("/jobs")
    async def jobs(request: Request) -> Response:
        session = pages.require(request)
        project_id = request.query_params.get("project", "")
        return pages.page(request, "jobs.html", jobs=await trainers.jobs(session, project_id), project_id=project_id)

    @app.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> Response:
        session = pages.require(request)
        return pages.page(request, "job.html", view=await trainers.job(session, job_id))

    @app.get("/jobs/{job_id}/events")
    async def events(request: Request, job_id: str) -> Response:
        session = pages.require(request)
        # An unknown job or another organisation's is an HTTP error here, before the stream starts.
        await trainers.job(session, job_id)
        stream = _server_sent(trainers, session, job_id, request.headers.get("last-event-id"))
        headers = SECURITY_HEADERS | {"x-accel-buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _server_sent(trainers: Trainers, session: Session, job_id: str, after: str | None) -> AsyncIterator[str]:
    """Each job event as one SSE message whose id is its sequence (a reconnecting EventSource resumes after it); an
    error once the stream began is an ``error`` event, which the page shows."""
    try:
        async for event in trainers.events(session, job_id, after):
            yield f"id: {event['sequence']}\ndata: {json.dumps(event)}\n\n"
    except GristmillError as exc:
        yield f"event: failure\ndata: {json.dumps({'message': exc.message})}\n\n"
