"""Text classification, single- and multi-label: an item is a text, an annotation is a choice of labels
from the project's schema (exactly one, or at least one), a dataset row is ``{"id", "text", "label"}``
(or ``"labels"`` for multi-label)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gristmill.core.chat import ROW_FORMAT_CLASSIFICATION
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.manifests import DatasetRow
from gristmill.core.values import json_type
from gristmill.labeling.domain.model import Item, LabelDefinition, LabelSchema, Response
from gristmill.labeling.domain.splits import DatasetItem


class TextClassification:
    """``LabelingTask`` for ``text-classification`` (``multi_label`` False) and its multi-label variant."""

    def __init__(self, name: str, *, multi_label: bool) -> None:
        self._name = name
        self.multi_label = multi_label

    @property
    def name(self) -> str:
        return self._name

    def check_schema(self, labels: Sequence[LabelDefinition]) -> None:
        minimum = 1 if self.multi_label else 2
        if len(labels) < minimum:
            kind = "multi-label" if self.multi_label else "single-label"
            raise InvalidArgumentError(
                f"labels: a {kind} classification schema needs at least {minimum} labels, got {len(labels)}"
            )

    def record_labels(self, labels: Sequence[str]) -> ClassificationRecordLabels:
        return ClassificationRecordLabels(labels, multi_label=self.multi_label)

    def check_annotation(self, labels: Sequence[str], schema: LabelSchema) -> tuple[str, ...]:
        names = schema.names
        for label in labels:
            if label not in names:
                raise InvalidArgumentError(
                    f"labels: {label[:80]!r} is not a label of the project's current schema "
                    f"(v{schema.version}: {', '.join(names)})"
                )
        if len(set(labels)) != len(labels):
            raise InvalidArgumentError("labels: a label appears twice")
        if self.multi_label:
            if not labels:
                raise InvalidArgumentError("labels: choose at least one label")
        elif len(labels) != 1:
            raise InvalidArgumentError(f"labels: a single-label project takes exactly one label, got {len(labels)}")
        return tuple(labels)

    def dataset_row(self, item: DatasetItem) -> DatasetRow:
        if self.multi_label:
            return DatasetRow(item.item_id, item.text, None, item.labels)
        return DatasetRow(item.item_id, item.text, item.labels[0])

    @property
    def generative(self) -> bool:
        return False

    @property
    def row_format(self) -> str:
        return ROW_FORMAT_CLASSIFICATION

    def check_response(
        self, labels: Sequence[str], response: Response, schema: LabelSchema, item: Item | None, where: str
    ) -> tuple[tuple[str, ...], Response]:
        if not response.empty:
            raise InvalidArgumentError(
                f"{where}response: replies, ratings and rankings are for chat and preference projects; a "
                f"{self._name} project takes labels"
            )
        return self.check_annotation(labels, schema), Response()

    def labels_of(self, response: Response) -> tuple[str, ...]:
        return ()

    def publishable(self, item: DatasetItem) -> DatasetItem | None:
        return item

    def dataset_lines(self, item: DatasetItem) -> list[str]:
        return [self.dataset_row(item).to_json()]


class ClassificationRecordLabels:
    """Labels of imported records for one schema: a string or a list of strings (JSON), a cell split on the
    separator (CSV, multi-label only), each a label of the schema; one per record unless multi-label."""

    def __init__(self, labels: Sequence[str], *, multi_label: bool) -> None:
        # Built once per import and consulted per record, so the set and the message text are made here.
        self.labels = frozenset(labels)
        self.label_list = ", ".join(labels)
        self.multi_label = multi_label

    def from_json(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise InvalidArgumentError(f"{where}: must be a string or a list of strings, got {json_type(value)}")

    def from_cell(self, cell: str, separator: str) -> tuple[str, ...]:
        if not cell:
            return ()
        if self.multi_label:
            return tuple(part.strip() for part in cell.split(separator) if part.strip())
        return (cell,)

    def check(self, labels: tuple[str, ...], where: str) -> tuple[str, ...]:
        if not labels:
            return ()
        if not self.multi_label and len(labels) != 1:
            raise InvalidArgumentError(f"{where}: a single-label project takes one label, got {len(labels)}")
        for label in labels:
            if label not in self.labels:
                raise InvalidArgumentError(
                    f"{where}: {label[:80]!r} is not a label of the project's schema ({self.label_list})"
                )
        return tuple(dict.fromkeys(labels))
