"""What every use case of the labeling service shares: the ports it works on, the clock, input checks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.ids import validate_id
from gristmill.core.storage import ObjectStore
from gristmill.core.values import DEFAULT_ORGANIZATION
from gristmill.labeling.domain.importer import IndexCache
from gristmill.labeling.domain.model import Project
from gristmill.labeling.domain.ports import LabelingStore
from gristmill.labeling.domain.tokens import TokenCounter, TokenizerSource, TokenLimit

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
    # Base models' tokenizers, for projects that limit tokens (None: such projects cannot be created or imported).
    tokenizers: TokenizerSource | None

    def get_project(self, organization_id: str, project_id: str) -> Project:
        return self.store.get_project(organization(organization_id), checked_project_id(project_id))

    def project_rules(self, organization_id: str, project_id: str) -> Project:
        """The project without its stats (a count over its items): for calls that need its schema and settings,
        such as each annotation's (one per key press in the console)."""
        return self.store.get_project(organization(organization_id), checked_project_id(project_id), with_stats=False)

    def token_counter(self, organization_id: str, tokenizer: str) -> TokenCounter:
        """The counter of base model ``tokenizer``: ``NotFoundError`` when the registry has no such base model,
        ``FailedPreconditionError`` when its tokenizer cannot be loaded (or this service has no registry),
        ``UnavailableError`` when the registry cannot be reached."""
        if self.tokenizers is None:
            raise FailedPreconditionError(
                "settings.cleaning.tokenizer: this labeling service has no registry to load tokenizers from",
                details={"field": "settings.cleaning.tokenizer"},
            )
        return self.tokenizers.counter(organization(organization_id), tokenizer)

    def token_limit(self, project: Project) -> TokenLimit | None:
        """The project's token limit with its tokenizer, or None when it has none. ``FailedPreconditionError``
        when its base model is gone or unusable, ``UnavailableError`` when the registry cannot be reached."""
        cleaning = project.settings.cleaning
        if not cleaning.max_tokens:
            return None
        try:
            counter = self.token_counter(project.organization_id, cleaning.tokenizer)
        except NotFoundError:
            raise FailedPreconditionError(
                f"project {project.project_id!r} counts tokens with base model {cleaning.tokenizer!r} "
                "(settings.cleaning.tokenizer), which no longer exists in the registry: set another tokenizer, "
                "or max_tokens 0",
                details={"field": "settings.cleaning.tokenizer"},
            ) from None
        return TokenLimit(counter, cleaning.max_tokens)


def check_text(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgumentError(f"{field} is longer than {limit:,} characters")


def checked_project_id(project_id: str) -> str:
    return validate_id(project_id, what="project_id")


def checked_item_id(item_id: str) -> str:
    return validate_id(item_id, what="item_id")
