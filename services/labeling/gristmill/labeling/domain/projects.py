"""Use cases of projects and their label schemas."""

from __future__ import annotations

from collections.abc import Sequence

from gristmill.core.errors import (
    AlreadyExistsError,
    DataIntegrityError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from gristmill.core.ids import validate_id
from gristmill.labeling.domain.common import (
    MAX_DISPLAY_NAME_CHARS,
    UseCases,
    check_text,
    checked_project_id,
    organization,
)
from gristmill.labeling.domain.model import LabelDefinition, LabelSchema, Project, ProjectSettings, TaskType
from gristmill.labeling.domain.schema import (
    MAX_DESCRIPTION_CHARS,
    schema_change_needed,
    slug_from,
    validate_labels,
    validate_settings,
)

_SLUG_ATTEMPTS = 20


class ProjectUseCases(UseCases):
    def create_project(
        self,
        organization_id: str,
        *,
        project_id: str,
        display_name: str,
        description: str,
        task_type: TaskType,
        labels: Sequence[LabelDefinition],
        settings: ProjectSettings,
    ) -> Project:
        org = organization(organization_id)
        check_text("display_name", display_name, MAX_DISPLAY_NAME_CHARS)
        check_text("description", description, MAX_DESCRIPTION_CHARS)
        checked_labels = validate_labels(task_type, labels)
        validate_settings(settings, task_type)
        derived = not project_id
        base = slug_from(display_name) if derived else validate_id(project_id, what="project_id")
        self._check_tokenizer(org, settings)
        now = self.clock()
        for attempt in range(_SLUG_ATTEMPTS if derived else 1):
            candidate = base if attempt == 0 else f"{base[:120]}-{attempt + 1}"
            project = Project(
                organization_id=org,
                project_id=candidate,
                display_name=display_name or candidate,
                description=description,
                task_type=task_type,
                label_schema=LabelSchema(candidate, 1, checked_labels, now),
                settings=settings,
                create_time=now,
                update_time=now,
            )
            try:
                return self.store.create_project(project)
            except AlreadyExistsError:
                if not derived or attempt == _SLUG_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def list_projects(self, organization_id: str, *, offset: int, limit: int) -> list[Project]:
        return self.store.list_projects(organization(organization_id), offset=offset, limit=limit)

    def update_project(
        self,
        organization_id: str,
        project_id: str,
        *,
        display_name: str | None,
        description: str | None,
        settings: ProjectSettings | None,
    ) -> Project:
        if display_name is not None:
            check_text("project.display_name", display_name, MAX_DISPLAY_NAME_CHARS)
        if description is not None:
            check_text("project.description", description, MAX_DESCRIPTION_CHARS)
        if settings is not None:
            current = self.get_project(organization_id, project_id)
            validate_settings(settings, current.task_type)
            cleaning, before = settings.cleaning, current.settings.cleaning
            if cleaning.tokenizer != before.tokenizer or (cleaning.max_tokens and not before.max_tokens):
                self._check_tokenizer(current.organization_id, settings)
        return self.store.update_project(
            organization(organization_id),
            checked_project_id(project_id),
            display_name=display_name,
            description=description,
            settings=settings,
            now=self.clock(),
        )

    def _check_tokenizer(self, organization_id: str, settings: ProjectSettings) -> None:
        """A tokenizer a project names must exist in the registry and load: checked when it is set, so that
        imports do not fail later (``UnavailableError`` when the registry cannot be reached)."""
        tokenizer = settings.cleaning.tokenizer
        if not tokenizer:
            return
        try:
            self.token_counter(organization_id, tokenizer)
        except NotFoundError:
            raise InvalidArgumentError(
                f"settings.cleaning.tokenizer: base model {tokenizer!r} does not exist in the registry",
                details={"field": "settings.cleaning.tokenizer"},
            ) from None
        except DataIntegrityError:
            raise  # stored files that fail their checksums: not the request's fault
        except FailedPreconditionError as exc:
            if self.tokenizers is None:
                raise
            # The base model exists but its tokenizer cannot be loaded: the setting is what is wrong.
            raise InvalidArgumentError(
                f"settings.cleaning.tokenizer: {exc.message}", details={"field": "settings.cleaning.tokenizer"}
            ) from None

    def update_label_schema(
        self, organization_id: str, project_id: str, labels: Sequence[LabelDefinition]
    ) -> LabelSchema:
        project = self.get_project(organization_id, project_id)
        checked = validate_labels(project.task_type, labels)
        return self.store.update_label_schema(
            project.organization_id, project.project_id, checked, self.clock(), rule=schema_change_needed
        )

    def get_label_schema(self, organization_id: str, project_id: str, version: int | None) -> LabelSchema:
        if version is not None and version < 1:
            raise InvalidArgumentError(f"version must be 1 or more, got {version}")
        return self.store.get_label_schema(organization(organization_id), checked_project_id(project_id), version)

    def list_label_schemas(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[LabelSchema]:
        return self.store.list_label_schemas(
            organization(organization_id), checked_project_id(project_id), offset=offset, limit=limit
        )
