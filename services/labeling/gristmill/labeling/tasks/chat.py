"""Chat: an item is a conversation; an annotator writes or edits its final assistant reply, rates it (1-5)
and may flag it (unsafe, wrong, off-topic). The consensus votes "accepted" or "rejected" per annotation
(rejected: flagged, or rated 1-2); an accepted item publishes one SFT row ``{"id", "messages"}`` whose last
turn is the reply the accepting annotators agree on most (a reviewer's reply wins)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from gristmill.core.chat import CHAT_FLAGS, MAX_RATING, MIN_RATING, ROW_FORMAT_SFT, Conversation, sft_row
from gristmill.core.errors import InvalidArgumentError
from gristmill.labeling.domain.model import Item, LabelSchema, Response
from gristmill.labeling.domain.splits import DatasetItem
from gristmill.labeling.tasks.generative import GenerativeTask, check_no_labels, conversation_of, lines, strata

ACCEPTED = "accepted"
REJECTED = "rejected"
# A rating at or below this rejects the reply even without a flag.
REJECT_AT_OR_BELOW = 2
MAX_REPLY_CHARS = 100_000


class Chat(GenerativeTask):
    _name = "chat"

    @property
    def row_format(self) -> str:
        return ROW_FORMAT_SFT

    def check_response(
        self, labels: Sequence[str], response: Response, schema: LabelSchema, item: Item | None, where: str
    ) -> tuple[tuple[str, ...], Response]:
        check_no_labels(labels, self._name, where)
        if response.ranking or response.tie:
            raise InvalidArgumentError(f"{where}response: ranking and tie are for preference projects")
        if response.rating and not MIN_RATING <= response.rating <= MAX_RATING:
            raise InvalidArgumentError(
                f"{where}response.rating: {response.rating} is out of range; rate {MIN_RATING}-{MAX_RATING} "
                "(0 leaves it unrated)"
            )
        for flag in response.flags:
            if flag not in CHAT_FLAGS:
                raise InvalidArgumentError(
                    f"{where}response.flags: {flag[:40]!r} is not a flag; flags: {', '.join(CHAT_FLAGS)}"
                )
        if len(set(response.flags)) != len(response.flags):
            raise InvalidArgumentError(f"{where}response.flags: a flag appears twice")
        if len(response.reply) > MAX_REPLY_CHARS:
            raise InvalidArgumentError(f"{where}response.reply: longer than {MAX_REPLY_CHARS:,} characters")
        conversation = conversation_of(item, where)
        reply = response.reply.strip()
        if not reply and conversation.final_reply is None and not response.flags:
            raise InvalidArgumentError(
                f"{where}response.reply: the conversation has no assistant reply yet; write one (or flag it)"
            )
        if not (reply or response.rating or response.flags):
            raise InvalidArgumentError(f"{where}response: give a reply, a rating or a flag")
        checked = replace(response, reply=reply, flags=tuple(sorted(response.flags)))
        return self.labels_of(checked), checked

    def labels_of(self, response: Response) -> tuple[str, ...]:
        rejected = bool(response.flags) or 0 < response.rating <= REJECT_AT_OR_BELOW
        return (REJECTED if rejected else ACCEPTED,)

    def publishable(self, item: DatasetItem) -> DatasetItem | None:
        if item.labels != (ACCEPTED,):
            return None
        conversation = Conversation.from_json(item.text)
        reply = _final_reply(item, conversation, self)
        if not reply:
            return None
        row = sft_row(item.item_id, conversation.with_reply(reply))
        return replace(item, labels=strata(item, conversation), text=lines([row]))


def _final_reply(item: DatasetItem, conversation: Conversation, task: Chat) -> str:
    """A reviewer's reply, else the reply most accepting annotators gave (an unedited reply counts as the
    item's own). On a tie an edit beats the reply as it was (someone took the trouble to improve it), then
    the earliest wins."""
    own = conversation.final_reply or ""
    if item.resolved_response is not None and item.resolved_response.reply:
        return item.resolved_response.reply
    votes = Counter(response.reply or own for response in item.responses if task.labels_of(response) == (ACCEPTED,))
    votes.pop("", None)
    if not votes:
        return own
    order = list(votes)
    return min(order, key=lambda reply: (-votes[reply], reply == own, order.index(reply)))
