"""What every use case of the labeling service shares: the ports it works on, the clock, input checks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.core.storage import ObjectStore
from gristmill.core.values import DEFAULT_ORGANIZATION
from gristmill.labeling.domain.importer import IndexCache
from gristmill.labeling.domain.model import Project
from gristmill.labeling.domain.ports import LabelingStore

Clock = Callable[[], datetime]

MAX_COMMENT_CHARS = 10_000
MAX_DISPLAY_NAME_CHARS = 512


def organization(organization_id: str) -> str:
    """Empty means the default organisation (auth and organisations come later)."""
    return organization_id or DEFAULT_ORGANIZATION


class UseCases:
    """The state the use cases of every aggregate share (``LabelingService`` sets it)."""

    store: LabelingStore
    objects: ObjectStore
    clock: Clock
    indexes: IndexCache

    def get_project(self, organization_id: str, project_id: str) -> Project:
        return self.store.get_project(organization(organization_id), checked_project_id(project_id))


def check_text(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgumentError(f"{field} is longer than {limit:,} characters")


def checked_project_id(project_id: str) -> str:
    return validate_id(project_id, what="project_id")


def checked_item_id(item_id: str) -> str:
    return validate_id(item_id, what="item_id")
