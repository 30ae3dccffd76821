"""Labeling's task types: what an item, an annotation and a dataset row are, per task type.

The service asks ``labeling_task(project.task_type)`` instead of assuming classification. A task type is
one module here implementing ``LabelingTask``, registered below; the generic parts of an import (file
formats, line limits, cleaning, deduplication, PII masking) and of publishing (splits, manifests,
checksums) stay in ``domain/`` and are the same for every task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gristmill.core.errors import GristmillError, InvalidArgumentError
from gristmill.core.manifests import DatasetRow
from gristmill.core.tasks import CHAT, PREFERENCE, TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION, TaskRegistry
from gristmill.labeling.domain.model import Item, LabelDefinition, LabelSchema, Response
from gristmill.labeling.domain.splits import DatasetItem


class RecordLabels(Protocol):
    """The labels part of an imported record, checked against one label schema (built once per import)."""

    def from_json(self, value: Any, where: str) -> tuple[str, ...]:
        """A JSON field's value as labels (``()`` when absent); ``where`` starts each error message."""
        ...

    def from_cell(self, cell: str, separator: str) -> tuple[str, ...]:
        """A CSV cell's text (stripped) as labels (``()`` when empty)."""
        ...

    def check(self, labels: tuple[str, ...], where: str) -> tuple[str, ...]:
        """The record's labels if the schema allows them (duplicates dropped), else ``InvalidArgumentError``."""
        ...


class LabelingTask(Protocol):
    """What labeling needs from a task type."""

    @property
    def name(self) -> str: ...

    def check_schema(self, labels: Sequence[LabelDefinition]) -> None:
        """``InvalidArgumentError`` when the label schema does not suit this task (e.g. too few labels)."""
        ...

    def record_labels(self, labels: Sequence[str]) -> RecordLabels:
        """How an imported record's labels are read and checked for the schema ``labels`` (names)."""
        ...

    def check_annotation(self, labels: Sequence[str], schema: LabelSchema) -> tuple[str, ...]:
        """An annotation's (or a resolution's) labels if valid for ``schema``, else ``InvalidArgumentError``."""
        ...

    def dataset_row(self, item: DatasetItem) -> DatasetRow:
        """The row an item with a consensus becomes in a published dataset version (classification)."""
        ...

    @property
    def generative(self) -> bool:
        """Whether items are conversations and annotations are responses (chat, preference)."""
        ...

    @property
    def row_format(self) -> str:
        """What a published row is (``gristmill.core.chat.ROW_FORMAT_*``), as the manifest names it."""
        ...

    def check_response(
        self, labels: Sequence[str], response: Response, schema: LabelSchema, item: Item | None, where: str
    ) -> tuple[tuple[str, ...], Response]:
        """An annotation's (or a resolution's) labels and response if valid, else ``InvalidArgumentError``
        naming ``where``'s field. Generative tasks derive the labels from the response (the consensus votes
        on them) and need the ``item``; classification takes labels and refuses a response."""
        ...

    def labels_of(self, response: Response) -> tuple[str, ...]:
        """The labels a (valid) response votes for, e.g. ``("candidate-1",)`` or ``("accepted",)``."""
        ...

    def publishable(self, item: DatasetItem) -> DatasetItem | None:
        """The item as it enters the split (its ``labels`` are what the split stratifies by), or None when it
        makes no row (a chat reply annotators rejected). Classification returns the item unchanged."""
        ...

    def dataset_lines(self, item: DatasetItem) -> list[str]:
        """The JSONL lines of one ``publishable`` item (a ranking of k replies gives several DPO pairs)."""
        ...


LABELING_TASKS: TaskRegistry[LabelingTask] = TaskRegistry("labeling")


def labeling_task(task_type: str, *, error: type[GristmillError] = InvalidArgumentError) -> LabelingTask:
    """The implementation for a project's task type (a name or an enum name; unset is text classification)."""
    return LABELING_TASKS.get(task_type, error=error)


def _register() -> None:
    from gristmill.labeling.tasks.chat import Chat
    from gristmill.labeling.tasks.preference import Preference
    from gristmill.labeling.tasks.text_classification import TextClassification

    LABELING_TASKS.register(TEXT_CLASSIFICATION, TextClassification(TEXT_CLASSIFICATION, multi_label=False))
    LABELING_TASKS.register(
        TEXT_MULTI_LABEL_CLASSIFICATION, TextClassification(TEXT_MULTI_LABEL_CLASSIFICATION, multi_label=True)
    )
    LABELING_TASKS.register(CHAT, Chat())
    LABELING_TASKS.register(PREFERENCE, Preference())


_register()
