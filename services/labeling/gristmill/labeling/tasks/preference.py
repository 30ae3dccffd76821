"""Preference: an item is a prompt (a conversation) with 2..N candidate replies; an annotator chooses the
best (a ranking of one), ranks several or all (best first), or calls it a tie. The consensus votes on the
best candidate ("candidate-<i>", or "tie"); a decided item publishes DPO rows ``{"id", "pair", "prompt",
"chosen", "rejected"}`` (TRL's conversational preference format): every pair its ranking orders, from a
reviewer's ranking or the first annotation that agrees with the consensus."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from gristmill.core.chat import ROW_FORMAT_DPO, Conversation, dpo_row
from gristmill.core.errors import InvalidArgumentError
from gristmill.labeling.domain.model import Item, LabelSchema, Response
from gristmill.labeling.domain.splits import DatasetItem
from gristmill.labeling.tasks.generative import GenerativeTask, check_no_labels, conversation_of, lines, strata

TIE = "tie"
_CANDIDATE = "candidate-"


class Preference(GenerativeTask):
    _name = "preference"

    @property
    def row_format(self) -> str:
        return ROW_FORMAT_DPO

    def check_response(
        self, labels: Sequence[str], response: Response, schema: LabelSchema, item: Item | None, where: str
    ) -> tuple[tuple[str, ...], Response]:
        check_no_labels(labels, self._name, where)
        if response.reply or response.rating or response.flags:
            raise InvalidArgumentError(f"{where}response: reply, rating and flags are for chat projects")
        if response.tie and response.ranking:
            raise InvalidArgumentError(f"{where}response: give a ranking or a tie, not both")
        if not response.tie and not response.ranking:
            raise InvalidArgumentError(
                f"{where}response.ranking: choose the best candidate (a ranking of one), rank them, or set tie"
            )
        count = len(conversation_of(item, where).candidates)
        for index in response.ranking:
            if not 0 <= index < count:
                raise InvalidArgumentError(
                    f"{where}response.ranking: {index} is not a candidate; the item has candidates 0-{count - 1}"
                )
        if len(set(response.ranking)) != len(response.ranking):
            raise InvalidArgumentError(f"{where}response.ranking: a candidate appears twice")
        return self.labels_of(response), response

    def labels_of(self, response: Response) -> tuple[str, ...]:
        if response.tie or not response.ranking:
            return (TIE,)
        return (f"{_CANDIDATE}{response.ranking[0]}",)

    def publishable(self, item: DatasetItem) -> DatasetItem | None:
        if not item.labels or item.labels == (TIE,):
            return None
        conversation = Conversation.from_json(item.text)
        ranking = self._ranking(item)
        if not ranking:
            return None
        rows: list[dict[str, Any]] = []
        for chosen, rejected in ranked_pairs(ranking, len(conversation.candidates)):
            better, worse = conversation.candidates[chosen], conversation.candidates[rejected]
            if better == worse:
                continue
            row = dpo_row(item.item_id, conversation.messages, better, worse)
            rows.append({"id": row.pop("id"), "pair": len(rows), **row})
        if not rows:
            return None
        return replace(item, labels=strata(item, conversation), text=lines(rows))

    def _ranking(self, item: DatasetItem) -> tuple[int, ...]:
        resolved = item.resolved_response
        if resolved is not None and resolved.ranking:
            return resolved.ranking
        for response in item.responses:
            if self.labels_of(response) == item.labels:
                return response.ranking
        return ()


def ranked_pairs(ranking: Sequence[int], count: int) -> list[tuple[int, int]]:
    """The (better, worse) pairs a ranking orders: each ranked candidate over every later ranked one and over
    every unranked one (a ranking of k of n candidates says nothing about the unranked among themselves)."""
    unranked = [index for index in range(count) if index not in ranking]
    pairs = []
    for position, better in enumerate(ranking):
        pairs += [(better, worse) for worse in ranking[position + 1 :]]
        pairs += [(better, worse) for worse in unranked]
    return pairs
