"""Length limits in tokens: a project's conversations counted by a named tokenizer and cut to fit.

A chat or preference project may set ``cleaning.max_tokens`` and ``cleaning.tokenizer`` (a registry base
model's name). On import, every conversation that passed the other cleaning steps is counted by that
tokenizer (``TokenCounter``, found through the ``TokenizerSource`` port; ``runtime/tokenizers.py`` implements
it). One that is too long loses its oldest complete exchanges, where an exchange is a user turn and the turns
that answer it (assistant replies, tool calls and results): system turns are always kept, and so is the last
exchange (for ``chat``, the last user turn and the final reply an annotator rates; for ``preference``, the
prompt's last user turn). The fewest exchanges are removed that make it fit; when even the system turns and
the last exchange do not fit, the conversation is dropped. A preference item is counted as its prompt
followed by each candidate reply as an assistant turn, and must fit with its longest one: candidates are
never cut (they are what annotators compare).

Counting is batched: ``TokenLimit.apply`` counts a batch of conversations in one call to the counter, then
searches the cut of every conversation that is too long at once (a binary search over the number of
exchanges removed, each round one call for the whole batch), so a tokenizer's batch encoder does the work.
Removing an exchange never adds tokens, which is what makes the search find the least cut (were a template
to break that, the cut found would still fit, only perhaps not be the least).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from gristmill.core.chat import ASSISTANT, SYSTEM, USER, ChatMessage, Conversation

# Without a chat template: what each turn adds besides its text (role and separator tokens), the usual
# estimate for chat formats (<|im_start|>role\n ... <|im_end|>\n is 4 or 5 tokens in ChatML).
TURN_OVERHEAD_TOKENS = 4
MAX_TOKENS_LIMIT = 1_000_000

Turns = Sequence[ChatMessage]


class TokenCounter(ABC):
    """The tokens of conversations as one base model's tokenizer counts them.

    Callable on one conversation (``counter(messages) -> int``); ``count_many`` counts a batch in one pass.
    """

    @abstractmethod
    def count_many(self, conversations: Sequence[Turns]) -> list[int]:
        """The tokens of each conversation, in order."""

    def __call__(self, messages: Turns) -> int:
        return self.count_many([messages])[0]


class TokenizerSource(ABC):
    """Where token counters come from: a registry base model's tokenizer, by name."""

    @abstractmethod
    def counter(self, organization_id: str, base_model_name: str) -> TokenCounter:
        """The counter of ``base_model_name``'s tokenizer, as ``organization_id`` sees the registry.

        ``NotFoundError``: no such base model. ``FailedPreconditionError``: its tokenizer cannot be loaded.
        ``UnavailableError``: the registry (or the object store) cannot be reached.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections (at shutdown)."""


@dataclass(frozen=True)
class Cut:
    """What the limit made of one conversation.

    ``conversation`` is None when it was dropped; ``removed_turns`` is how many turns were cut from it (0 when
    it fitted as it was); ``tokens`` are the tokens of what was kept, or of its shortest form when dropped.
    """

    conversation: Conversation | None
    removed_turns: int
    tokens: int

    @property
    def dropped(self) -> bool:
        return self.conversation is None


def cut_points(messages: Turns) -> list[int]:
    """Where each exchange after the first starts (the index of its user turn), oldest first.

    Cutting at point ``p`` keeps the system turns and ``messages[p:]``.
    """
    first = 0
    while first < len(messages) and messages[first].role == SYSTEM:
        first += 1
    users = [index for index in range(first, len(messages)) if messages[index].role == USER]
    return [index for index in users if index > first]


def system_turns(messages: Turns) -> int:
    """How many system turns start the conversation."""
    count = 0
    while count < len(messages) and messages[count].role == SYSTEM:
        count += 1
    return count


def cut_at(conversation: Conversation, point: int) -> Conversation:
    """``conversation`` without the turns between its system turns and ``point``."""
    messages = conversation.messages
    system = system_turns(messages)
    return Conversation((*messages[:system], *messages[point:]), conversation.candidates)


def remove_turns(conversation: Conversation, count: int) -> Conversation:
    """``conversation`` without the ``count`` turns after its system turns (what a ``Cut`` removed)."""
    if count == 0:
        return conversation
    return cut_at(conversation, system_turns(conversation.messages) + count)


def _forms(conversation: Conversation) -> list[Turns]:
    """What is counted: the conversation, or for a preference item its prompt with each candidate."""
    if not conversation.candidates:
        return [conversation.messages]
    return [(*conversation.messages, ChatMessage(ASSISTANT, candidate)) for candidate in conversation.candidates]


class TokenLimit:
    """A project's ``max_tokens`` with its tokenizer's counter: cuts or drops conversations, in batches."""

    def __init__(self, counter: TokenCounter, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.counter = counter
        self.max_tokens = max_tokens

    def _count(self, conversations: Sequence[Conversation]) -> list[int]:
        """Tokens of each conversation (a preference item's: with its longest candidate), in one counter call."""
        if not conversations:
            return []
        forms = [_forms(conversation) for conversation in conversations]
        counts = self.counter.count_many([form for group in forms for form in group])
        result, start = [], 0
        for group in forms:
            result.append(max(counts[start : start + len(group)]))
            start += len(group)
        return result

    def apply(self, conversations: Sequence[Conversation]) -> list[Cut]:
        """Each conversation kept whole, cut to fit, or dropped (``Cut``), in order."""
        if not conversations:
            return []
        tokens = self._count(conversations)
        cuts: list[Cut | None] = [
            Cut(conversation, 0, count) if count <= self.max_tokens else None
            for conversation, count in zip(conversations, tokens, strict=True)
        ]
        over = [index for index, cut in enumerate(cuts) if cut is None]
        if over:
            shortened = self._shorten([conversations[i] for i in over], [tokens[i] for i in over])
            for index, cut in zip(over, shortened, strict=True):
                cuts[index] = cut
        return [cut for cut in cuts if cut is not None]

    def _shorten(self, conversations: Sequence[Conversation], tokens: Sequence[int]) -> list[Cut]:
        """The least cut that fits, for conversations too long as they are (``tokens``: their counts).

        Per conversation, the candidates are its cut points (removing 1, 2, ... exchanges); the last one (only
        the last exchange left) is counted first, and a conversation that does not fit even so is dropped.
        Then a binary search between "nothing removed" (too long) and the shortest fitting cut, every round
        counting the middle cut of each unresolved conversation in one batch.
        """
        points = [cut_points(conversation.messages) for conversation in conversations]
        # Search bounds per conversation, as indexes into its points: ``low`` does not fit (-1: uncut), ``high``
        # fits (None: nothing fits).
        low = [-1] * len(conversations)
        high: list[int | None] = [None] * len(conversations)
        kept_tokens: dict[int, int] = {}
        shortest = [index for index, own in enumerate(points) if own]
        shortest_tokens = self._count([cut_at(conversations[index], points[index][-1]) for index in shortest])
        dropped_tokens = list(tokens)
        for index, count in zip(shortest, shortest_tokens, strict=True):
            dropped_tokens[index] = count
            if count <= self.max_tokens:
                high[index] = len(points[index]) - 1
                kept_tokens[index] = count
        while True:
            rounds = [
                (index, (low[index] + top) // 2)
                for index, top in enumerate(high)
                if top is not None and top - low[index] > 1
            ]
            if not rounds:
                break
            counts = self._count([cut_at(conversations[index], points[index][middle]) for index, middle in rounds])
            for (index, middle), count in zip(rounds, counts, strict=True):
                if count <= self.max_tokens:
                    high[index] = middle
                    kept_tokens[index] = count
                else:
                    low[index] = middle
        cuts = []
        for index, conversation in enumerate(conversations):
            top = high[index]
            if top is None:
                # Not even the system turns and the last exchange fit: the tokens of that shortest form.
                cuts.append(Cut(None, 0, dropped_tokens[index]))
                continue
            point = points[index][top]
            removed = point - system_turns(conversation.messages)
            cuts.append(Cut(cut_at(conversation, point), removed, kept_tokens[index]))
        return cuts
