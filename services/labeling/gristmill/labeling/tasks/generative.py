"""What chat and preference share: no label schema, conversations as items, responses as annotations,
and splits stratified by where an item came from and how long it is."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gristmill.core.chat import Conversation
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.manifests import DatasetRow
from gristmill.labeling.domain.model import Item, LabelDefinition, LabelSchema
from gristmill.labeling.domain.splits import DatasetItem

# Length strata of a conversation (characters of all its turns): short / medium / long.
_LENGTH_BOUNDS = ((600, "short"), (2_400, "medium"))


class NoRecordLabels:
    """A conversation import has no label field: what the source says about a conversation (a DPO record's
    chosen reply) arrives as a response instead."""

    def from_json(self, value: Any, where: str) -> tuple[str, ...]:
        return ()

    def from_cell(self, cell: str, separator: str) -> tuple[str, ...]:
        return ()

    def check(self, labels: tuple[str, ...], where: str) -> tuple[str, ...]:
        if labels:
            raise InvalidArgumentError(f"{where}: chat and preference projects have no labels")
        return ()


class GenerativeTask:
    """The parts of ``LabelingTask`` chat and preference have in common."""

    _name = ""

    @property
    def name(self) -> str:
        return self._name

    @property
    def generative(self) -> bool:
        return True

    def check_schema(self, labels: Sequence[LabelDefinition]) -> None:
        if labels:
            raise InvalidArgumentError(
                f"labels: a {self._name} project has no label schema (annotators write, rate or rank replies); "
                "leave labels empty"
            )

    def record_labels(self, labels: Sequence[str]) -> NoRecordLabels:
        return NoRecordLabels()

    def check_annotation(self, labels: Sequence[str], schema: LabelSchema) -> tuple[str, ...]:
        raise InvalidArgumentError(f"labels: a {self._name} project's annotations are responses, not labels")

    def dataset_row(self, item: DatasetItem) -> DatasetRow:
        raise InvalidArgumentError(f"a {self._name} item is not a classification row")

    def dataset_lines(self, item: DatasetItem) -> list[str]:
        # ``publishable`` put the rows, one JSON object per line, in the item's text.
        return item.text.split("\n")


def conversation_of(item: Item | None, where: str) -> Conversation:
    if item is None or item.conversation is None:
        raise InvalidArgumentError(f"{where}the item is not a conversation")
    return item.conversation


def strata(item: DatasetItem, conversation: Conversation) -> tuple[str, ...]:
    """What a generative split stratifies by: the item's source and its length class, so every split gets
    its share of feedback-born and imported, short and long conversations."""
    size = len(conversation.contents())
    length = next((name for bound, name in _LENGTH_BOUNDS if size < bound), "long")
    source = item.source.removeprefix("ITEM_SOURCE_").lower() or "import"
    return (f"source:{source}", f"length:{length}")


def lines(rows: Sequence[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in rows)


def check_no_labels(labels: Sequence[str], task: str, where: str) -> None:
    if labels:
        raise InvalidArgumentError(
            f"{where}labels: a {task} project takes a response (reply, rating, flags, ranking or tie), not labels"
        )
