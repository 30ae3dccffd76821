"""Routes of the training pages (jobs, their live curves)."""

from __future__ import annotations

from fastapi import FastAPI

from gristmill.console.api.render import Pages
from gristmill.console.gateway import Services


def add_routes(app: FastAPI, pages: Pages, services: Services) -> None:
    """Nothing yet."""
