"""Chat and preference records in and out (gristmill.core.chat_formats): every shape, every bad input, and
round trips (a published row exported in a format and read back is the same conversation)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from gristmill.core.chat import ASSISTANT, SYSTEM, TOOL, USER, ChatMessage, Conversation, dpo_row, sft_row
from gristmill.core.chat_formats import (
    EXPORT_FORMATS,
    ParsedConversation,
    check_conversation,
    export_row,
    parse_conversation_record,
)
from gristmill.core.errors import InvalidArgumentError

CALLS = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]


def _chat(obj: dict[str, Any]) -> ParsedConversation:
    return parse_conversation_record(obj, "line 7", preference=False)


def _pref(obj: dict[str, Any]) -> ParsedConversation:
    return parse_conversation_record(obj, "line 7", preference=True)


def _roles(parsed: ParsedConversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in parsed.conversation.messages]


# --------------------------------------------------------------------------- shapes


def test_openai_messages_with_tool_calls_kept_verbatim() -> None:
    parsed = _chat(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": CALLS},
                {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_1", "name": "weather"},
                {"role": "assistant", "content": "3 degrees."},
            ]
        }
    )
    assert parsed.source_format == "openai" and parsed.ranking == ()
    assert parsed.fields == {"messages"}
    messages = parsed.conversation.messages
    assert [m.role for m in messages] == [SYSTEM, USER, ASSISTANT, TOOL, ASSISTANT]
    assert json.loads(messages[2].tool_calls) == CALLS
    assert (messages[3].tool_call_id, messages[3].name) == ("call_1", "weather")
    assert parsed.conversation.final_reply == "3 degrees."


def test_openai_content_parts_are_joined() -> None:
    parsed = _chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"text": "there"}]}]})
    assert _roles(parsed) == [(USER, "hi there")]


def test_alpaca_with_input_system_and_history() -> None:
    parsed = _chat(
        {
            "instruction": "Translate",
            "input": "bonjour",
            "output": "hello",
            "system": "You translate.",
            "history": [["Hi", "Hello! What can I do?"]],
        }
    )
    assert parsed.source_format == "alpaca"
    assert _roles(parsed) == [
        (SYSTEM, "You translate."),
        (USER, "Hi"),
        (ASSISTANT, "Hello! What can I do?"),
        (USER, "Translate\n\nbonjour"),
        (ASSISTANT, "hello"),
    ]
    assert parsed.fields == {"instruction", "input", "output", "system", "history"}


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "   "}, {"input": None}])
def test_alpaca_without_input_is_the_instruction_alone(extra: dict[str, Any]) -> None:
    parsed = _chat({"instruction": "Say hi", "output": "hi", **extra})
    assert _roles(parsed) == [(USER, "Say hi"), (ASSISTANT, "hi")]


def test_alpaca_without_output_has_no_reply_yet() -> None:
    assert _chat({"instruction": "Say hi"}).conversation.final_reply is None


def test_sharegpt_speakers_and_function_calls() -> None:
    parsed = _chat(
        {
            "system": "Use tools.",
            "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                {"from": "observation", "value": '{"temp": 3}'},
                {"from": "function_call", "value": "not json, just text"},
                {"from": "user", "value": "And tomorrow?"},
                {"from": "gpt", "value": "Also cold."},
            ],
            "tools": "[...]",
        }
    )
    assert parsed.source_format == "sharegpt"
    assert parsed.fields == {"conversations", "system"}  # "tools" is the caller's (metadata)
    messages = parsed.conversation.messages
    assert [m.role for m in messages] == [SYSTEM, USER, ASSISTANT, TOOL, ASSISTANT, USER, ASSISTANT]
    assert json.loads(messages[2].tool_calls) == {"name": "weather", "arguments": {"city": "Oslo"}}
    assert messages[2].content == ""
    assert (messages[4].content, messages[4].tool_calls) == ("not json, just text", "")


def test_dpo_pair_order_is_by_hash_and_the_ranking_puts_chosen_first() -> None:
    seen_first = set()
    for chosen, rejected in [("Paris.", "Lyon."), ("Lyon.", "Paris."), ("Yes", "No"), ("No", "Yes")]:
        parsed = _pref({"prompt": "Capital of France?", "chosen": chosen, "rejected": rejected})
        assert parsed.source_format == "dpo"
        candidates = parsed.conversation.candidates
        assert candidates == tuple(sorted((chosen, rejected), key=lambda t: hashlib.sha256(t.encode()).digest()))
        assert candidates[parsed.ranking[0]] == chosen and candidates[parsed.ranking[1]] == rejected
        seen_first.add(parsed.ranking[0])
        assert _roles(parsed) == [(USER, "Capital of France?")]
    assert seen_first == {0, 1}  # the chosen reply is not always shown first


def test_dpo_conversational_takes_the_last_assistant_message() -> None:
    parsed = _pref(
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate my poem"}],
            "chosen": [{"role": "assistant", "content": "It is lovely."}],
            "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "It is bad."}],
        }
    )
    assert _roles(parsed) == [(SYSTEM, "Be kind."), (USER, "Rate my poem")]
    assert set(parsed.conversation.candidates) == {"It is lovely.", "It is bad."}
    assert parsed.conversation.candidates[parsed.ranking[0]] == "It is lovely."
    assert parsed.fields == {"prompt", "chosen", "rejected"}


def test_dpo_implicit_prompt() -> None:
    prompt = [{"role": "user", "content": "Hi"}]
    parsed = _pref(
        {
            "chosen": [*prompt, {"role": "assistant", "content": "Hello!"}],
            "rejected": [*prompt, {"role": "assistant", "content": "Go away."}],
        }
    )
    assert parsed.source_format == "dpo"
    assert _roles(parsed) == [(USER, "Hi")]
    assert parsed.conversation.candidates[parsed.ranking[0]] == "Hello!"


def test_candidates_without_a_preference() -> None:
    by_prompt = _pref({"prompt": "Name a colour", "candidates": ["red", "blue", "green"]})
    assert (by_prompt.source_format, by_prompt.ranking) == ("dpo", ())
    assert by_prompt.conversation.candidates == ("red", "blue", "green")
    by_messages = _pref({"messages": [{"role": "user", "content": "Name a colour"}], "candidates": ["red", "blue"]})
    assert by_messages.source_format == "openai" and by_messages.conversation.candidates == ("red", "blue")
    assert by_messages.fields == {"messages", "candidates"}


def test_llama_factory_preference_records() -> None:
    alpaca = _pref({"instruction": "Greet", "input": "", "chosen": "Hello!", "rejected": "Meh."})
    assert alpaca.source_format == "alpaca" and _roles(alpaca) == [(USER, "Greet")]
    assert alpaca.conversation.candidates[alpaca.ranking[0]] == "Hello!"
    sharegpt = _pref(
        {
            "conversations": [{"from": "human", "value": "Greet"}],
            "chosen": {"from": "gpt", "value": "Hello!"},
            "rejected": {"from": "gpt", "value": "Meh."},
        }
    )
    assert sharegpt.source_format == "sharegpt"
    assert sharegpt.conversation.candidates[sharegpt.ranking[0]] == "Hello!"


# --------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], r"^line 7: expected a JSON object, got an array"),
        ({"text": "hello"}, r"^line 7: not a conversation record \(fields: 'text'\); accepted shapes: OpenAI"),
        ({"messages": [], "conversations": []}, r"^line 7: fields 'messages' and 'conversations' start different"),
        ({"messages": "hi"}, r"^line 7, field 'messages': must be an array of messages, got str"),
        ({"messages": [{"role": "user", "content": 3}]}, r"^line 7, messages\[0\], field 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"^line 7, messages\[0\], field 'role': unknown role"),
        ({"messages": []}, r"^line 7: the conversation has no messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, r"^line 7: the conversation has no user turn"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
            r"^line 7, message 1: an assistant turn comes before any user turn",
        ),
        ({"conversations": {"from": "human"}}, r"^line 7, field 'conversations': must be an array of turns"),
        ({"conversations": ["hi"]}, r"^line 7, conversations\[0\]: a turn must be an object"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, r"^line 7, conversations\[0\], field 'from': unknown"),
        ({"conversations": [{"from": "human", "value": 1}]}, r"^line 7, conversations\[0\], field 'value'"),
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, r"^line 7, message 1: an assistant turn comes before"),
        ({"conversations": [], "system": 5}, r"^line 7, field 'system': must be a string, got a number"),
        ({"instruction": 5, "output": "x"}, r"^line 7, field 'instruction': must be a string, got a number"),
        ({"instruction": "x", "output": ["a"]}, r"^line 7, field 'output': must be a string, got an array"),
        ({"instruction": "x", "history": [["a"]]}, r"^line 7, field 'history\[0\]': must be a \[user, assistant\]"),
        ({"instruction": "x", "history": "a"}, r"^line 7, field 'history': must be an array"),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B"},
            r"^line 7: this is a preference record \(field 'chosen'\); import it into a preference project",
        ),
        ({"prompt": "Q"}, r"^line 7: a record with a 'prompt' is a preference record"),
        ({"messages": [{"role": "user", "content": "Q"}], "candidates": ["a", "b"]}, r"^line 7: this is a preference"),
        ({"chosen": [], "rejected": []}, r"^line 7: this is a preference record"),
    ],
)
def test_a_bad_chat_record_names_the_line_and_the_field(record: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _chat(record)


USER_Q = [{"role": "user", "content": "Q"}]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": USER_Q}, r"^line 7: a preference project needs candidate replies.* this openai record has none"),
        ({"instruction": "Q", "output": "A"}, r"^line 7: a preference project needs .* this alpaca record has none"),
        ({"prompt": "Q", "chosen": "A"}, r"^line 7, field 'rejected': missing"),
        ({"prompt": "Q", "chosen": "Same ", "rejected": " Same"}, r"^line 7, fields 'chosen' and 'rejected': the same"),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, r"^line 7, fields 'chosen' and 'rejected': a preference item"),
        ({"prompt": "Q", "candidates": ["a", "a"]}, r"^line 7, field 'candidates': a preference item needs at least 2"),
        ({"prompt": "Q", "candidates": ["a"]}, r"^line 7, field 'candidates': a preference item needs at least 2"),
        ({"prompt": "Q", "candidates": [str(i) for i in range(17)]}, r"^line 7, field 'candidates': at most 16"),
        ({"prompt": "Q", "candidates": "a,b"}, r"^line 7, field 'candidates': must be an array of strings"),
        ({"prompt": "Q", "candidates": ["a", 2]}, r"^line 7, field 'candidates\[1\]': must be a string"),
        ({"prompt": "Q", "candidates": ["a", "b"], "chosen": "a"}, r"not both"),
        ({"prompt": 3, "chosen": "A", "rejected": "B"}, r"^line 7, field 'prompt': must be a string or an array"),
        ({"prompt": "Q", "chosen": 3, "rejected": "B"}, r"^line 7, field 'chosen': must be a string, a message"),
        (
            {"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
            r"^line 7, field 'chosen': has no assistant message",
        ),
        (
            {"prompt": [*USER_Q, {"role": "assistant", "content": "A"}], "chosen": "B", "rejected": "C"},
            r"^line 7: a preference prompt must end before the reply",
        ),
        ({"prompt": [{"role": "assistant", "content": "A"}], "candidates": ["a", "b"]}, r"^line 7, message 1: an"),
        ({"prompt": [{"role": "system", "content": "S"}], "candidates": ["a", "b"]}, r"^line 7: .* no user turn"),
        ({"instruction": "Q", "output": "A", "chosen": "B", "rejected": "C"}, r"^line 7, field 'output': a pref"),
        (
            {"chosen": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user", "content": "Q"}]},
            r"^line 7, fields 'chosen' and 'rejected': without a 'prompt', they must be the same conversation",
        ),
        ({"chosen": "A", "rejected": "B"}, r"^line 7, field 'chosen': without a 'prompt'"),
    ],
)
def test_a_bad_preference_record_names_the_line_and_the_field(record: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _pref(record)


def test_check_conversation_of_a_structured_item() -> None:
    hi = ChatMessage(USER, "hi")
    check_conversation(Conversation((hi, ChatMessage(ASSISTANT, "hello"))), "item 1", preference=False)
    check_conversation(Conversation((hi,), ("a", "b")), "item 1", preference=True)
    with pytest.raises(InvalidArgumentError, match=r"^item 1, message 1, field 'role': unknown role 'robot'"):
        check_conversation(Conversation((ChatMessage("robot", "x"),)), "item 1", preference=False)
    with pytest.raises(InvalidArgumentError, match=r"^item 1, message 2, field 'tool_calls': not JSON text"):
        check_conversation(Conversation((hi, ChatMessage(ASSISTANT, "", "{oops"))), "item 1", preference=False)
    with pytest.raises(InvalidArgumentError, match=r"^item 1, field 'candidates': candidate replies are for pref"):
        check_conversation(Conversation((hi,), ("a", "b")), "item 1", preference=False)
    with pytest.raises(InvalidArgumentError, match=r"^item 1: a preference item needs at least 2"):
        check_conversation(Conversation((hi,), ("a",)), "item 1", preference=True)


# --------------------------------------------------------------------------- exports and round trips


SFT_MESSAGES = (
    ChatMessage(SYSTEM, "Be brief."),
    ChatMessage(USER, "Hi"),
    ChatMessage(ASSISTANT, "Hello!"),
    ChatMessage(USER, "Capital of France?"),
    ChatMessage(ASSISTANT, "Paris."),
)
TOOL_MESSAGES = (
    ChatMessage(USER, "Weather in Oslo?"),
    ChatMessage(ASSISTANT, "", json.dumps(CALLS, separators=(",", ":"))),
    ChatMessage(TOOL, "3 degrees", tool_call_id="call_1"),
    ChatMessage(ASSISTANT, "It is 3 degrees."),
)


def test_export_formats() -> None:
    assert EXPORT_FORMATS == ("openai", "alpaca", "sharegpt", "dpo")
    row = sft_row("item-1", Conversation(SFT_MESSAGES))
    assert export_row(row, "openai") == {"messages": row["messages"]}
    assert export_row(row, "alpaca") == {
        "instruction": "Capital of France?",
        "input": "",
        "output": "Paris.",
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
    }
    assert export_row(row, "sharegpt") == {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
        ],
        "system": "Be brief.",
    }


def test_a_preference_row_exports_as_dpo_unchanged_and_as_chat_with_the_chosen_reply() -> None:
    row = {"id": "item-2", "pair": 0, **dpo_row("item-2", SFT_MESSAGES[:4], "Paris.", "Lyon.")}
    assert export_row(row, "dpo") == {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    assert export_row(row, "openai") == {"messages": [m.to_json() for m in SFT_MESSAGES]}
    assert export_row(row, "alpaca")["output"] == "Paris."


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        (sft_row("r1", Conversation(TOOL_MESSAGES)), "alpaca", r"^row 'r1': a conversation with tool calls"),
        (sft_row("r1", Conversation(SFT_MESSAGES)), "dpo", r"^row 'r1': a chat \(SFT\) row has no chosen"),
        (sft_row("r1", Conversation(SFT_MESSAGES)), "csv", r"^unknown export format 'csv'"),
        ({"id": "r1", "text": "x"}, "openai", r"^row 'r1': not a published chat row"),
        (
            sft_row("r1", Conversation((ChatMessage(USER, "a"), ChatMessage(USER, "b")))),
            "alpaca",
            r"^row 'r1': alpaca needs alternating user and assistant turns",
        ),
    ],
)
def test_a_row_a_format_cannot_hold_is_refused_naming_the_row(row: dict[str, Any], fmt: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        export_row(row, fmt)


_ROUND_TRIPS = {
    "system-history": SFT_MESSAGES,
    "no-system": SFT_MESSAGES[1:],
    "no-reply": (ChatMessage(USER, "Only a question"),),
    "tools": TOOL_MESSAGES,
}


@pytest.mark.parametrize(
    ("fmt", "messages"),
    # Alpaca cannot hold tool turns (refused above).
    [
        (fmt, msgs)
        for fmt in ("openai", "alpaca", "sharegpt")
        for name, msgs in _ROUND_TRIPS.items()
        if not (fmt == "alpaca" and name == "tools")
    ],
)
def test_chat_round_trip(fmt: str, messages: tuple[ChatMessage, ...]) -> None:
    conversation = Conversation(messages)
    exported = export_row(sft_row("r1", conversation), fmt)
    parsed = _chat(json.loads(json.dumps(exported)))
    assert parsed.source_format == fmt
    if fmt == "sharegpt" and messages is TOOL_MESSAGES:
        # ShareGPT has no tool call ids: everything else survives.
        expected = tuple(ChatMessage(m.role, m.content, m.tool_calls) for m in messages)
        assert parsed.conversation == Conversation(expected)
    else:
        assert parsed.conversation == conversation


def test_preference_round_trip() -> None:
    prompt = SFT_MESSAGES[:4]
    row = dpo_row("r2", prompt, "Paris.", "Lyon.")
    parsed = _pref(json.loads(json.dumps(export_row(row, "dpo"))))
    assert parsed.conversation.messages == prompt
    assert parsed.conversation.candidates[parsed.ranking[0]] == "Paris."
    assert parsed.conversation.candidates[parsed.ranking[1]] == "Lyon."
    # And as a chat record: the prompt and the chosen reply.
    assert _chat(export_row(row, "sharegpt")).conversation == Conversation((*prompt, ChatMessage(ASSISTANT, "Paris.")))
