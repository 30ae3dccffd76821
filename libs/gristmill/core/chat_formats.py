"""Chat and preference records in the formats they come in and go out in: OpenAI chat, Alpaca, ShareGPT, DPO.

Reading: ``parse_conversation_record`` detects one JSON record's shape and returns it as a ``Conversation``
(``gristmill.core.chat``), checked, with the preference the source states:

- OpenAI chat ``{"messages": [{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}, ...]}``;
- Alpaca (LLaMA-Factory) ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``;
- ShareGPT ``{"conversations": [{"from", "value"}, ...], "system"?}``;
- DPO (TRL) ``{"prompt", "chosen", "rejected"}``: the prompt a string or messages, each reply a string or
  messages (the last assistant message is the reply); without a prompt, ``chosen`` and ``rejected`` are
  two whole conversations that differ in their final reply (TRL's implicit prompt).

A preference record is any of these with candidate replies: ``chosen`` and ``rejected`` (also on Alpaca and
ShareGPT records, as LLaMA-Factory writes them) or ``candidates: [str, ...]`` (no preference stated).

Writing: ``export_row`` turns one published row (``sft_row`` / ``dpo_row``) into one of ``EXPORT_FORMATS``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gristmill.core.chat import (
    ASSISTANT,
    ROLES,
    SYSTEM,
    TOOL,
    USER,
    ChatMessage,
    Conversation,
    check_candidates,
    check_turns,
    message_from_json,
    unbiased_pair,
)
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.values import json_type

FORMAT_OPENAI = "openai"
FORMAT_ALPACA = "alpaca"
FORMAT_SHAREGPT = "sharegpt"
FORMAT_DPO = "dpo"
# What ``gristmill datasets export --format`` writes (and what an import's report counts records by).
EXPORT_FORMATS: tuple[str, ...] = (FORMAT_OPENAI, FORMAT_ALPACA, FORMAT_SHAREGPT, FORMAT_DPO)

# The field that says which shape a record has, in the order they are looked for.
_SHAPE_KEYS: dict[str, str] = {
    "messages": FORMAT_OPENAI,
    "conversations": FORMAT_SHAREGPT,
    "instruction": FORMAT_ALPACA,
    "prompt": FORMAT_DPO,
}
# The top-level fields each shape reads; a record's other fields are the caller's (metadata).
_SHAPE_FIELDS: dict[str, frozenset[str]] = {
    FORMAT_OPENAI: frozenset({"messages"}),
    FORMAT_SHAREGPT: frozenset({"conversations", "system"}),
    FORMAT_ALPACA: frozenset({"instruction", "input", "output", "system", "history"}),
    FORMAT_DPO: frozenset({"prompt"}),
}
_PREFERENCE_FIELDS = ("chosen", "rejected", "candidates")
SHAPES_HELP = (
    'accepted shapes: OpenAI chat {"messages": [{"role", "content"}, ...]}; Alpaca {"instruction", "input", '
    '"output"}; ShareGPT {"conversations": [{"from", "value"}, ...]}; preference {"prompt", "chosen", "rejected"} '
    'or {"prompt" or "messages", "candidates": [...]}'
)

# ShareGPT speakers (LLaMA-Factory's names and the common aliases) → roles.
_SHAREGPT_ROLES: dict[str, str] = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "system": SYSTEM,
    "function_call": ASSISTANT,
    "observation": TOOL,
    "tool": TOOL,
}
_SHAREGPT_SPEAKERS = {USER: "human", ASSISTANT: "gpt", SYSTEM: "system", TOOL: "observation"}
_FUNCTION_CALL = "function_call"


@dataclass(frozen=True)
class ParsedConversation:
    """One record read: the conversation (checked), the shape it came in, and what the source prefers."""

    conversation: Conversation
    # One of ``EXPORT_FORMATS``.
    source_format: str
    # Candidate indices, best first, when the source states a preference (a DPO pair: chosen, rejected).
    ranking: tuple[int, ...] = ()
    # The record's top-level fields the shape read; the others are left to the caller.
    fields: frozenset[str] = frozenset()


def parse_conversation_record(obj: Any, where: str, *, preference: bool) -> ParsedConversation:
    """The conversation of one JSON record, for a preference project (``preference``) or a chat project.

    ``InvalidArgumentError`` whose message starts with ``where`` (``line 7``) and names the field when the
    record has no known shape, wrong JSON types, turns that make no conversation (``check_turns``), or
    candidates a preference item cannot have (``check_candidates``); and when a chat project gets a
    preference record or a preference project a record without candidate replies.
    """
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"{where}: expected a JSON object, got {json_type(obj)}")
    keys = [key for key in _SHAPE_KEYS if key in obj]
    if len(keys) > 1:
        raise InvalidArgumentError(
            f"{where}: fields {' and '.join(repr(k) for k in keys)} start different shapes; a record has one; "
            + SHAPES_HELP
        )
    stated = [key for key in _PREFERENCE_FIELDS if key in obj]
    if not keys:
        if "chosen" in obj or "rejected" in obj:
            return _implicit_prompt(obj, where, preference=preference)
        raise InvalidArgumentError(f"{where}: not a conversation record (fields: {_field_list(obj)}); {SHAPES_HELP}")
    source_format = _SHAPE_KEYS[keys[0]]
    if stated and not preference:
        raise InvalidArgumentError(
            f"{where}: this is a preference record (field {stated[0]!r}); import it into a preference project"
        )
    if not preference and source_format == FORMAT_DPO:
        raise InvalidArgumentError(
            f"{where}: a record with a 'prompt' is a preference record; import it into a preference project, "
            'or give a chat record as {"messages": [...]}'
        )
    if preference and not stated:
        raise InvalidArgumentError(
            f"{where}: a preference project needs candidate replies, fields 'chosen' and 'rejected' or "
            f"'candidates'; this {source_format} record has none (import it into a chat project)"
        )
    if source_format == FORMAT_OPENAI:
        messages = _openai_messages(obj["messages"], where, "messages")
    elif source_format == FORMAT_SHAREGPT:
        messages = _sharegpt_messages(obj, where)
    elif source_format == FORMAT_ALPACA:
        messages = _alpaca_messages(obj, where, preference=preference)
    else:
        messages = _prompt_messages(obj["prompt"], where)
    fields = _SHAPE_FIELDS[source_format]
    if not preference:
        check_turns(messages, where)
        return ParsedConversation(Conversation(tuple(messages)), source_format, (), fields)
    check_turns(messages, where, prompt_only=True)
    candidates, ranking = _candidates(obj, where)
    return ParsedConversation(Conversation(tuple(messages), candidates), source_format, ranking, fields.union(stated))


def check_conversation(conversation: Conversation, where: str, *, preference: bool) -> None:
    """``InvalidArgumentError`` naming ``where`` unless ``conversation`` is a valid chat item (``preference``
    False: turns, no candidates) or preference item (a prompt and candidate replies): for conversations that
    arrive already structured (an API request) rather than as a record ``parse_conversation_record`` read."""
    for number, message in enumerate(conversation.messages, start=1):
        if message.role not in ROLES:
            raise InvalidArgumentError(
                f"{where}, message {number}, field 'role': unknown role {message.role[:40]!r}; roles: "
                + ", ".join(ROLES)
            )
        if message.tool_calls:
            try:
                json.loads(message.tool_calls)
            except ValueError:
                raise InvalidArgumentError(f"{where}, message {number}, field 'tool_calls': not JSON text") from None
    if not preference:
        check_turns(conversation.messages, where)
        if conversation.candidates:
            raise InvalidArgumentError(
                f"{where}, field 'candidates': candidate replies are for preference projects; a chat item's "
                "reply is its last assistant turn"
            )
        return
    check_turns(conversation.messages, where, prompt_only=True)
    check_candidates(conversation.candidates, where)


# --------------------------------------------------------------------------- reading: shapes


def _openai_messages(value: Any, where: str, field: str) -> list[ChatMessage]:
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{where}, field {field!r}: must be an array of messages, got {json_type(value)}")
    return [message_from_json(message, f"{where}, {field}[{i}]") for i, message in enumerate(value)]


def _sharegpt_messages(obj: dict[str, Any], where: str) -> list[ChatMessage]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise InvalidArgumentError(f"{where}, field 'conversations': must be an array of turns, got {json_type(turns)}")
    messages = []
    system = _optional_string(obj, "system", where)
    if system:
        messages.append(ChatMessage(SYSTEM, system))
    for i, turn in enumerate(turns):
        at = f"{where}, conversations[{i}]"
        if not isinstance(turn, dict):
            raise InvalidArgumentError(f"{at}: a turn must be an object with 'from' and 'value'")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str):
            raise InvalidArgumentError(f"{at}, field 'from': missing or not a string")
        role = _SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise InvalidArgumentError(
                f"{at}, field 'from': unknown speaker {speaker[:40]!r}; speakers: {', '.join(_SHAREGPT_ROLES)}"
            )
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{at}, field 'value': must be a string, got {json_type(value)}")
        calls = _json_text(value) if speaker == _FUNCTION_CALL else None
        messages.append(ChatMessage(role, "", calls) if calls is not None else ChatMessage(role, value))
    return messages


def _alpaca_messages(obj: dict[str, Any], where: str, *, preference: bool) -> list[ChatMessage]:
    instruction = obj["instruction"]
    if not isinstance(instruction, str):
        raise InvalidArgumentError(f"{where}, field 'instruction': must be a string, got {json_type(instruction)}")
    extra = _optional_string(obj, "input", where)
    output = _optional_string(obj, "output", where)
    system = _optional_string(obj, "system", where)
    if preference and output is not None:
        raise InvalidArgumentError(
            f"{where}, field 'output': a preference record gives its replies as 'chosen' and 'rejected' (or "
            "'candidates'), not 'output'"
        )
    messages = [ChatMessage(SYSTEM, system)] if system else []
    history = obj.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise InvalidArgumentError(
                f"{where}, field 'history': must be an array of [user, assistant] pairs, got {json_type(history)}"
            )
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
                raise InvalidArgumentError(
                    f"{where}, field 'history[{i}]': must be a [user, assistant] pair of strings"
                )
            messages += [ChatMessage(USER, pair[0]), ChatMessage(ASSISTANT, pair[1])]
    question = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages.append(ChatMessage(USER, question))
    if output:
        messages.append(ChatMessage(ASSISTANT, output))
    return messages


def _prompt_messages(value: Any, where: str) -> list[ChatMessage]:
    if isinstance(value, str):
        return [ChatMessage(USER, value)]
    if isinstance(value, list):
        return _openai_messages(value, where, "prompt")
    raise InvalidArgumentError(
        f"{where}, field 'prompt': must be a string or an array of messages, got {json_type(value)}"
    )


def _implicit_prompt(obj: dict[str, Any], where: str, *, preference: bool) -> ParsedConversation:
    """TRL's implicit-prompt preference record: ``chosen`` and ``rejected`` are whole conversations."""
    if not preference:
        raise InvalidArgumentError(
            f"{where}: this is a preference record (fields 'chosen' and 'rejected'); import it into a preference "
            "project"
        )
    if "candidates" in obj:
        raise _both_kinds_of_candidates(where)
    sides = []
    for field in ("chosen", "rejected"):
        value = obj.get(field)
        if not isinstance(value, list):
            raise InvalidArgumentError(
                f"{where}, field {field!r}: without a 'prompt', 'chosen' and 'rejected' must both be arrays of "
                f"messages (the whole conversation), got {json_type(value)}; {SHAPES_HELP}"
            )
        sides.append(_openai_messages(value, where, field))
    chosen, rejected = sides
    if not (
        chosen
        and rejected
        and chosen[-1].role == ASSISTANT
        and rejected[-1].role == ASSISTANT
        and chosen[:-1] == rejected[:-1]
    ):
        raise InvalidArgumentError(
            f"{where}, fields 'chosen' and 'rejected': without a 'prompt', they must be the same conversation up "
            "to a different final assistant reply"
        )
    prompt = chosen[:-1]
    check_turns(prompt, where, prompt_only=True)
    candidates, ranking = _pair(chosen[-1].content, rejected[-1].content, where)
    return ParsedConversation(
        Conversation(tuple(prompt), candidates), FORMAT_DPO, ranking, frozenset({"chosen", "rejected"})
    )


def _candidates(obj: dict[str, Any], where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if "candidates" in obj:
        if "chosen" in obj or "rejected" in obj:
            raise _both_kinds_of_candidates(where)
        value = obj["candidates"]
        if not isinstance(value, list):
            raise InvalidArgumentError(
                f"{where}, field 'candidates': must be an array of strings, got {json_type(value)}"
            )
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise InvalidArgumentError(f"{where}, field 'candidates[{i}]': must be a string, got {json_type(text)}")
        check_candidates(value, f"{where}, field 'candidates'")
        return tuple(value), ()
    chosen = _reply(obj.get("chosen"), where, "chosen")
    rejected = _reply(obj.get("rejected"), where, "rejected")
    return _pair(chosen, rejected, where)


def _both_kinds_of_candidates(where: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{where}, field 'candidates': give 'chosen' and 'rejected' or 'candidates', not both")


def _pair(chosen: str, rejected: str, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The two candidates in an order the source does not decide (by the SHA-256 of their text, so the
    chosen reply is not always shown first) and the ranking that puts the chosen one first."""
    if chosen.strip() == rejected.strip():
        raise InvalidArgumentError(
            f"{where}, fields 'chosen' and 'rejected': the same reply; a preference pair needs two different replies"
        )
    check_candidates((chosen, rejected), f"{where}, fields 'chosen' and 'rejected'")
    return unbiased_pair(chosen, rejected)


def _reply(value: Any, where: str, field: str) -> str:
    """A ``chosen`` / ``rejected`` reply: a string, a message object, or messages (the last assistant's)."""
    if value is None:
        raise InvalidArgumentError(
            f"{where}, field {field!r}: missing; a preference record needs both 'chosen' and 'rejected'"
        )
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InvalidArgumentError(
            f"{where}, field {field!r}: must be a string, a message or an array of messages, got {json_type(value)}"
        )
    for i in range(len(value) - 1, -1, -1):
        message = _any_message(value[i], f"{where}, {field}[{i}]")
        if message.role == ASSISTANT:
            return message.content
    raise InvalidArgumentError(f"{where}, field {field!r}: has no assistant message (the reply)")


def _any_message(value: Any, where: str) -> ChatMessage:
    """An OpenAI message, or a ShareGPT turn ({"from", "value"}) as LLaMA-Factory writes preference replies."""
    if isinstance(value, dict) and "from" in value and "role" not in value:
        speaker, text = value.get("from"), value.get("value")
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(text, str):
            raise InvalidArgumentError(f"{where}: a turn must have a known 'from' and a string 'value'")
        return ChatMessage(role, text)
    return message_from_json(value, where)


def _optional_string(obj: dict[str, Any], field: str, where: str) -> str | None:
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise InvalidArgumentError(f"{where}, field {field!r}: must be a string, got {json_type(value)}")
    return value


def _json_text(value: str) -> str | None:
    """``value`` as compact JSON text when it is a JSON object or array (a tool call), else None."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    if not isinstance(parsed, dict | list):
        return None
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))


def _field_list(obj: Mapping[str, Any]) -> str:
    names = [repr(key)[:40] for key in list(obj)[:8]]
    return ", ".join(names) + (", ..." if len(obj) > 8 else "") if names else "none"


# --------------------------------------------------------------------------- writing


def export_row(row: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """One published row (``sft_row``'s ``{"id", "messages"}`` or ``dpo_row``'s ``{"id", "prompt", "chosen",
    "rejected"}``) as a record of ``fmt`` (one of ``EXPORT_FORMATS``). A preference row written as a chat
    format is its prompt followed by the chosen reply. ``InvalidArgumentError`` naming the row id when the
    format cannot hold the row (Alpaca has no tool turns; a chat row has no preference to write as DPO)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidArgumentError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    name = f"row {str(row.get('id', ''))[:80]!r}"
    if isinstance(row.get("messages"), list):
        messages: list[Any] = row["messages"]
        preference = False
    elif all(isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")):
        messages = [*row["prompt"], *row["chosen"]]
        preference = True
    else:
        raise InvalidArgumentError(
            f"{name}: not a published chat row {{'id', 'messages'}} or preference row {{'id', 'prompt', 'chosen', "
            "'rejected'}"
        )
    if fmt == FORMAT_DPO:
        if not preference:
            raise InvalidArgumentError(
                f"{name}: a chat (SFT) row has no chosen and rejected replies to write as dpo; export it as "
                "openai, alpaca or sharegpt"
            )
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if fmt == FORMAT_OPENAI:
        return {"messages": messages}
    parsed = [message_from_json(message, f"{name}, message {i + 1}") for i, message in enumerate(messages)]
    if fmt == FORMAT_ALPACA:
        return _to_alpaca(parsed, name)
    return _to_sharegpt(parsed)


def _to_alpaca(messages: Sequence[ChatMessage], name: str) -> dict[str, Any]:
    if any(m.role == TOOL or m.tool_calls for m in messages):
        raise InvalidArgumentError(
            f"{name}: a conversation with tool calls cannot be written as alpaca; export it as openai or sharegpt"
        )
    systems = [m.content for m in messages if m.role == SYSTEM]
    if len(systems) > 1:
        raise InvalidArgumentError(
            f"{name}: alpaca has one system prompt, this conversation has {len(systems)}; export it as openai "
            "or sharegpt"
        )
    turns = [m for m in messages if m.role != SYSTEM]
    expected = [USER if i % 2 == 0 else ASSISTANT for i in range(len(turns))]
    if not turns or [m.role for m in turns] != expected:
        raise InvalidArgumentError(
            f"{name}: alpaca needs alternating user and assistant turns, starting with the user; export it as "
            "openai or sharegpt"
        )
    if turns[-1].role == USER:
        history, instruction, output = turns[:-1], turns[-1].content, ""
    else:
        history, instruction, output = turns[:-2], turns[-2].content, turns[-1].content
    out: dict[str, Any] = {"instruction": instruction, "input": "", "output": output}
    if systems:
        out["system"] = systems[0]
    if history:
        out["history"] = [[history[i].content, history[i + 1].content] for i in range(0, len(history), 2)]
    return out


def _to_sharegpt(messages: Sequence[ChatMessage]) -> dict[str, Any]:
    turns: list[dict[str, str]] = []
    system = None
    for i, message in enumerate(messages):
        if i == 0 and message.role == SYSTEM:
            system = message.content
            continue
        if message.role == ASSISTANT and message.tool_calls:
            if message.content:
                turns.append({"from": "gpt", "value": message.content})
            turns.append({"from": _FUNCTION_CALL, "value": message.tool_calls})
            continue
        turns.append({"from": _SHAREGPT_SPEAKERS[message.role], "value": message.content})
    out: dict[str, Any] = {"conversations": turns}
    if system is not None:
        out["system"] = system
    return out
