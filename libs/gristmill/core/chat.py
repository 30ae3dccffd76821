"""Conversations: the one internal form of chat and preference data, defined once for every service.

Labeling stores an item of a ``chat`` or ``preference`` project as a ``Conversation`` (its canonical JSON is
the item's stored text, so exact deduplication hashes the whole conversation); publishing writes the rows
training reads (``sft_row`` / ``dpo_row``, the shapes TRL's ``SFTTrainer`` and ``DPOTrainer`` accept in
their conversational form); serving's feedback arrives as the same messages.

- a ``chat`` item: ``messages`` (system / user / assistant / tool turns); its last assistant turn, if any,
  is the reply annotators edit and rate;
- a ``preference`` item: ``messages`` is the prompt (it ends before the reply) and ``candidates`` are the
  2..N replies annotators choose between or rank.

Tool calls are kept verbatim: ``tool_calls`` holds the source's JSON text unchanged, never re-interpreted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gristmill.core.errors import InvalidArgumentError

SYSTEM = "system"
USER = "user"
ASSISTANT = "assistant"
TOOL = "tool"
ROLES: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, TOOL)

# What an annotator may flag a chat reply as.
CHAT_FLAGS: tuple[str, ...] = ("unsafe", "wrong", "off-topic")
MIN_RATING = 1
MAX_RATING = 5
MIN_CANDIDATES = 2
MAX_CANDIDATES = 16

# Dataset row formats (the manifest's ``row_format``).
ROW_FORMAT_CLASSIFICATION = "classification"
ROW_FORMAT_SFT = "sft-messages"
ROW_FORMAT_DPO = "dpo-conversational"


class FeedbackKind(StrEnum):
    """What a user did about a model's reply (serving records it, labeling turns it into items); the value is
    also a feedback item's ``feedback_kind`` metadata."""

    THUMBS_UP = "thumbs_up"
    THUMBS_DOWN = "thumbs_down"
    RATING = "rating"
    REGENERATE = "regenerate"
    EDIT = "edit"
    TEXT = "text"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    # The source's tool calls as JSON text, kept verbatim (assistant turns that call tools).
    tool_calls: str = ""
    # A tool turn: the id of the call it answers.
    tool_call_id: str = ""
    # Optional speaker or tool name.
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = json.loads(self.tool_calls)
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Conversation:
    messages: tuple[ChatMessage, ...]
    # Preference items only: the candidate replies to the prompt ``messages``.
    candidates: tuple[str, ...] = field(default=())

    @property
    def final_reply(self) -> str | None:
        """The content of the last turn when it is the assistant's (the reply a chat annotator edits)."""
        if self.messages and self.messages[-1].role == ASSISTANT:
            return self.messages[-1].content
        return None

    @property
    def prompt(self) -> tuple[ChatMessage, ...]:
        """The turns before the final reply (all turns when there is none)."""
        return self.messages[:-1] if self.final_reply is not None else self.messages

    def with_reply(self, reply: str) -> Conversation:
        """This conversation with ``reply`` as its final assistant turn (replacing the existing one)."""
        return Conversation((*self.prompt, ChatMessage(ASSISTANT, reply)), self.candidates)

    def contents(self) -> str:
        """Every turn's and candidate's text, one per line: what near-duplicate detection compares (the JSON
        keys and roles every conversation shares would make unrelated short conversations look alike)."""
        return "\n".join([m.content for m in self.messages] + list(self.candidates))

    def to_json(self) -> str:
        """The canonical JSON text: the stored form, and the text whose hash finds exact duplicates."""
        out: dict[str, Any] = {"messages": [m.to_json() for m in self.messages]}
        if self.candidates:
            out["candidates"] = list(self.candidates)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        """The conversation of canonical JSON written by ``to_json`` (stored data; trusted to be well formed)."""
        data = json.loads(text)
        return cls(
            tuple(message_from_json(m, "stored conversation") for m in data["messages"]),
            tuple(data.get("candidates", ())),
        )


def message_from_json(value: Any, where: str) -> ChatMessage:
    """One ``{"role", "content", ...}`` object (OpenAI's message shape) as a ``ChatMessage``; errors name ``where``."""
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where}: a message must be an object with 'role' and 'content'")
    role = value.get("role")
    if not isinstance(role, str):
        raise InvalidArgumentError(f"{where}, field 'role': missing or not a string")
    if role not in ROLES:
        raise InvalidArgumentError(f"{where}, field 'role': unknown role {role[:40]!r}; roles: {', '.join(ROLES)}")
    content = value.get("content")
    tool_calls = value.get("tool_calls")
    if content is None and tool_calls is not None:
        content = ""
    if isinstance(content, list):
        # OpenAI's content parts: the text parts, joined (images and audio are not for text projects).
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise InvalidArgumentError(f"{where}, field 'content': must be a string")
    tool_call_id = value.get("tool_call_id") or ""
    name = value.get("name") or ""
    if not isinstance(tool_call_id, str) or not isinstance(name, str):
        raise InvalidArgumentError(f"{where}: 'tool_call_id' and 'name' must be strings")
    calls = json.dumps(tool_calls, ensure_ascii=False, separators=(",", ":")) if tool_calls is not None else ""
    return ChatMessage(role, content, calls, tool_call_id, name)


def check_turns(messages: Sequence[ChatMessage], where: str, *, prompt_only: bool = False) -> None:
    """``InvalidArgumentError`` naming ``where`` unless the turns make a conversation: at least one user turn,
    no assistant turn before the first user turn, system turns only at the start; a prompt (``prompt_only``)
    must not end with an assistant turn."""
    if not messages:
        raise InvalidArgumentError(f"{where}: the conversation has no messages")
    seen_user = False
    for index, message in enumerate(messages):
        if message.role == USER:
            seen_user = True
        elif message.role == ASSISTANT and not seen_user:
            raise InvalidArgumentError(f"{where}, message {index + 1}: an assistant turn comes before any user turn")
        elif message.role == SYSTEM and any(m.role != SYSTEM for m in messages[:index]):
            raise InvalidArgumentError(f"{where}, message {index + 1}: a system turn after the conversation started")
    if not seen_user:
        raise InvalidArgumentError(f"{where}: the conversation has no user turn")
    if prompt_only and messages[-1].role == ASSISTANT:
        raise InvalidArgumentError(
            f"{where}: a preference prompt must end before the reply, not with an assistant turn"
        )


def check_candidates(candidates: Sequence[str], where: str) -> None:
    """``InvalidArgumentError`` unless there are 2..MAX_CANDIDATES replies, at least two of them distinct."""
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidArgumentError(f"{where}: at most {MAX_CANDIDATES} candidate replies, got {len(candidates)}")
    if len({c for c in candidates if c.strip()}) < MIN_CANDIDATES:
        raise InvalidArgumentError(
            f"{where}: a preference item needs at least {MIN_CANDIDATES} distinct, non-empty candidate replies"
        )


def unbiased_pair(chosen: str, rejected: str) -> tuple[tuple[str, str], tuple[int, int]]:
    """Two candidate replies in an order that does not reveal which is preferred (by the SHA-256 of their
    text, so the chosen one is not always shown first to an annotator), and the ranking that puts the chosen
    one first."""
    if hashlib.sha256(chosen.encode()).digest() <= hashlib.sha256(rejected.encode()).digest():
        return (chosen, rejected), (0, 1)
    return (rejected, chosen), (1, 0)


def sft_row(item_id: str, conversation: Conversation) -> dict[str, Any]:
    """A published ``chat`` row: ``{"id", "messages"}`` (TRL's conversational language-modelling format)."""
    return {"id": item_id, "messages": [m.to_json() for m in conversation.messages]}


def dpo_row(item_id: str, prompt: Sequence[ChatMessage], chosen: str, rejected: str) -> dict[str, Any]:
    """A published ``preference`` row in TRL's conversational preference format:
    ``{"id", "prompt": [messages], "chosen": [assistant], "rejected": [assistant]}``."""
    return {
        "id": item_id,
        "prompt": [m.to_json() for m in prompt],
        "chosen": [{"role": ASSISTANT, "content": chosen}],
        "rejected": [{"role": ASSISTANT, "content": rejected}],
    }
