"""Conversation imports into chat and preference projects, through the in-process service: every source
format, cleaning of every turn (normalisation, PII), exact and near duplicates over the whole conversation,
limits, bad records, redelivery."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gristmill.core.chat import ASSISTANT, SYSTEM, TOOL, USER, ChatMessage, Conversation
from gristmill.core.errors import InvalidArgumentError
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService

Rows = list[dict[str, Any]]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"email": "a@b.example"}'}}]


@pytest.fixture
def make_generative(make_project: Any) -> Any:
    def make(
        project_id: str = "chat", task_type: m.TaskType = m.TaskType.CHAT, *, cleaning: m.CleaningSettings | None = None
    ) -> m.Project:
        return make_project(project_id, task_type=task_type, cleaning=cleaning)

    return make


def _items(service: LabelingService, project_id: str = "chat", *, annotations: bool = False) -> list[m.Item]:
    return service.list_items(
        "", project_id, statuses=[], source=None, include_annotations=annotations, offset=0, limit=1000
    )


def _by_id(service: LabelingService, project_id: str = "chat", *, annotations: bool = False) -> dict[str, m.Item]:
    return {item.external_id: item for item in _items(service, project_id, annotations=annotations)}


def _openai(*turns: str, record_id: str = "", **extra: Any) -> dict[str, Any]:
    roles = [USER if i % 2 == 0 else ASSISTANT for i in range(len(turns))]
    record: dict[str, Any] = {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]}
    if record_id:
        record["id"] = record_id
    return {**record, **extra}


def test_every_chat_format_imports_as_a_conversation(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative()
    report = import_jsonl(
        "chat",
        [
            _openai("How do I reset my router?", "Hold the reset button for ten seconds.", record_id="o1", topic="net"),
            {
                "id": "a1",
                "instruction": "Summarise the text",
                "input": "The meeting moved to Friday afternoon.",
                "output": "Meeting now on Friday.",
                "system": "You summarise.",
                "history": [["Hello there", "Hi, how can I help you today?"]],
            },
            {
                "id": "s1",
                "conversations": [
                    {"from": "human", "value": "Which invoice is overdue?"},
                    {"from": "function_call", "value": '{"name": "invoices", "arguments": {"status": "late"}}'},
                    {"from": "observation", "value": "invoice 17 is overdue"},
                    {"from": "gpt", "value": "Invoice 17 is overdue."},
                ],
                "tools": [{"name": "invoices"}],
            },
        ],
    )
    assert (report.received_count, report.accepted_count) == (3, 3)
    assert report.records_by_format == {"openai": 1, "alpaca": 1, "sharegpt": 1}
    items = _by_id(service)
    assert set(items) == {"o1", "a1", "s1"}
    openai = items["o1"].conversation
    assert openai is not None and openai.final_reply == "Hold the reset button for ten seconds."
    # Fields the shape does not read are metadata, as for text imports; the stored text is the canonical JSON.
    assert items["o1"].metadata == {"topic": "net"}
    assert Conversation.from_json(items["o1"].text) == openai
    alpaca = items["a1"].conversation
    assert alpaca is not None
    assert [(t.role, t.content) for t in alpaca.messages] == [
        (SYSTEM, "You summarise."),
        (USER, "Hello there"),
        (ASSISTANT, "Hi, how can I help you today?"),
        (USER, "Summarise the text\n\nThe meeting moved to Friday afternoon."),
        (ASSISTANT, "Meeting now on Friday."),
    ]
    sharegpt = items["s1"].conversation
    assert sharegpt is not None
    assert [t.role for t in sharegpt.messages] == [USER, ASSISTANT, TOOL, ASSISTANT]
    assert json.loads(sharegpt.messages[1].tool_calls) == {"name": "invoices", "arguments": {"status": "late"}}
    assert items["s1"].metadata == {"tools": '[{"name":"invoices"}]'}
    assert service.get_import("", "chat", report.import_id).records_by_format == report.records_by_format


def test_preference_records_import_with_the_source_ranking_as_the_import_annotation(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative("pref", m.TaskType.PREFERENCE)
    report = import_jsonl(
        "pref",
        [
            {"id": "d1", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, probably."},
            {
                "id": "d2",
                "prompt": [{"role": "user", "content": "Say something kind"}],
                "chosen": [{"role": "assistant", "content": "You are doing great."}],
                "rejected": [{"role": "assistant", "content": "Whatever."}],
            },
            {"id": "c1", "prompt": "Name a primary colour", "candidates": ["red", "blue", "yellow"]},
            {
                "id": "c2",
                "messages": [{"role": "user", "content": "Pick a fruit for breakfast"}],
                "candidates": ["apple", "banana"],
            },
        ],
    )
    assert report.accepted_count == 4
    assert report.records_by_format == {"dpo": 3, "openai": 1}
    assert report.imported_label_count == 2  # the two DPO pairs state a preference
    items = _by_id(service, "pref", annotations=True)
    for external_id, chosen in (("d1", "Paris."), ("d2", "You are doing great.")):
        item = items[external_id]
        assert item.conversation is not None
        (note,) = item.annotations
        assert note.annotator_id == "import"
        assert item.conversation.candidates[note.response.ranking[0]] == chosen
        assert item.status is m.ItemStatus.LABELED
    assert items["c1"].conversation is not None and items["c1"].conversation.candidates == ("red", "blue", "yellow")
    assert (items["c1"].annotations, items["c1"].status) == ((), m.ItemStatus.UNLABELED)


def test_pii_is_masked_in_every_turn_tool_call_and_candidate(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative()
    make_generative("pref", m.TaskType.PREFERENCE)
    report = import_jsonl(
        "chat",
        [
            {
                "id": "p1",
                "messages": [
                    {"role": "system", "content": "Escalate to ops@corp.example when unsure."},
                    {"role": "user", "content": "I am jane@example.com, call +1 415 555 0100"},
                    {"role": "assistant", "content": None, "tool_calls": CALLS},
                    {"role": "tool", "content": "found jane@example.com", "tool_call_id": "call_1"},
                    {"role": "assistant", "content": "Done, jane@example.com is updated."},
                ],
            },
            _openai("No personal data here", "Fine by me", record_id="clean"),
        ],
    )
    assert report.pii_masked_item_count == 1
    assert report.pii_masked_by_kind == {"EMAIL": 5, "PHONE": 1}
    conversation = _by_id(service)["p1"].conversation
    assert conversation is not None
    assert [t.content for t in conversation.messages] == [
        "Escalate to [EMAIL] when unsure.",
        "I am [EMAIL], call [PHONE]",
        "",
        "found [EMAIL]",
        "Done, [EMAIL] is updated.",
    ]
    calls = json.loads(conversation.messages[2].tool_calls)
    assert calls[0]["function"]["arguments"] == '{"email": "[EMAIL]"}'
    assert "example.com" not in _by_id(service)["p1"].text
    pref = import_jsonl(
        "pref", [{"prompt": "Who to call?", "chosen": "Call 0612 345 678", "rejected": "Mail bob@example.com"}]
    )
    assert pref.pii_masked_by_kind == {"PHONE": 1, "EMAIL": 1}
    (item,) = _items(service, "pref")
    assert item.conversation is not None
    assert set(item.conversation.candidates) == {"Call [PHONE]", "Mail [EMAIL]"}


def test_turns_are_normalised_keeping_their_lines(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative()
    reply = "Use this:\r\n\r\n```python\ndef f(x):   \n    return  x\n```\u2028Done.  "
    report = import_jsonl("chat", [_openai("  Write   f\u00a0please ", reply, record_id="n1")])
    assert report.normalized_count == 1
    conversation = _by_id(service)["n1"].conversation
    assert conversation is not None
    assert [t.content for t in conversation.messages] == [
        "Write f please",
        "Use this:\n\n```python\ndef f(x):\n    return x\n```\nDone.",
    ]


def test_exact_duplicates_cover_the_whole_conversation(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative(cleaning=m.CleaningSettings(near_duplicate_policy=m.NearDuplicatePolicy.OFF))
    question = "My laptop battery drains overnight while the lid is closed, what can I check?"
    report = import_jsonl(
        "chat",
        [
            _openai(question, "Check the sleep settings and disable wake timers.", record_id="a"),
            _openai("  " + question, "Check the sleep  settings and disable wake timers.  ", record_id="same"),
            # The same question with another reply is another conversation.
            _openai(question, "Update the firmware first.", record_id="other-reply"),
            # The same turns in another shape are the same conversation.
            {"id": "alpaca", "instruction": question, "output": "Check the sleep settings and disable wake timers."},
        ],
    )
    assert (report.accepted_count, report.dropped_exact_duplicate_count) == (2, 2)
    drops = {d.external_id: d.reason for d in report.drops}
    assert drops == {"same": m.DropReason.EXACT_DUPLICATE, "alpaca": m.DropReason.EXACT_DUPLICATE}
    assert set(_by_id(service)) == {"a", "other-reply"}
    again = import_jsonl("chat", [_openai(question, "Update the firmware first.", record_id="later")])
    assert again.dropped_exact_duplicate_count == 1


def test_near_duplicates_compare_the_contents_not_the_json(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative()
    first = "The printer in the second floor office keeps jamming on double sided pages"
    reply = "Clean the rollers, then check the duplex unit for torn paper and reseat the tray."
    report = import_jsonl(
        "chat",
        [
            _openai(first, reply, record_id="orig"),
            _openai(first.upper() + "!", reply, record_id="near"),
            # Short, unrelated conversations share only the JSON's keys and roles: none is a near duplicate.
            *(_openai(f"word{i}", f"reply{i}", record_id=f"short{i}") for i in range(20)),
        ],
    )
    assert report.dropped_near_duplicate_count == 1
    (near,) = [d for d in report.drops if d.reason is m.DropReason.NEAR_DUPLICATE]
    assert near.external_id == "near" and near.similarity >= 0.9
    assert service.get_item("", "chat", near.duplicate_of_item_id).external_id == "orig"
    assert report.accepted_count == 21


def test_empty_and_too_long_conversations_are_dropped(make_generative: Any, import_jsonl: Any) -> None:
    make_generative(cleaning=m.CleaningSettings(max_text_chars=100))
    make_generative("pref", m.TaskType.PREFERENCE)
    report = import_jsonl(
        "chat",
        [
            _openai("   ", "a reply to nothing", record_id="empty"),
            _openai("x" * 60, "y" * 41, record_id="long"),  # 101 characters in all
            _openai("x" * 60, "y" * 40, record_id="fits"),
        ],
    )
    assert (report.dropped_empty_count, report.dropped_too_long_count, report.accepted_count) == (1, 1, 1)
    assert {d.external_id: d.reason for d in report.drops} == {
        "empty": m.DropReason.EMPTY,
        "long": m.DropReason.TOO_LONG,
    }
    # Candidates that differ only in spacing, or in masked PII, leave fewer than two replies: EMPTY too.
    pref = import_jsonl(
        "pref",
        [
            {"id": "spaces", "prompt": "Q", "chosen": "the  same words", "rejected": "the same words"},
            {"id": "masked", "prompt": "Q", "chosen": "mail a@x.example", "rejected": "mail b@x.example"},
            {"id": "blank", "prompt": "Q", "candidates": ["fine ", " \t ", "fine"]},
            {"id": "ok", "prompt": "Q", "candidates": ["one", " ", "two"]},
        ],
    )
    assert pref.dropped_empty_count == 3 and pref.accepted_count == 1


def test_a_ranking_follows_its_candidates_when_blank_ones_go(make_generative: Any, service: LabelingService) -> None:
    make_generative("pref", m.TaskType.PREFERENCE)
    session = service.begin_import("", m.ImportOptions("pref", m.ImportFormat.ITEMS))
    assert not isinstance(session, m.ImportReport)
    conversation = Conversation((ChatMessage(USER, "Best pet?"),), ("   ", "a cat", "a dog"))
    record = session.builder.build_conversation(1, "r1", conversation, (2, 0, 1), {}, "openai")
    session.feed_records([record])
    report = service.finish_import(session)
    assert report.accepted_count == 1
    (item,) = _items(service, "pref", annotations=True)
    assert item.conversation is not None and item.conversation.candidates == ("a cat", "a dog")
    assert item.annotations[0].response.ranking == (1, 0)
    assert item.consensus.labels == ("candidate-1",)


@pytest.mark.parametrize(
    ("task_type", "line", "message"),
    [
        (m.TaskType.CHAT, '{"messages": [{"role": "system", "content": "S"}]}', r"^line 2: .* no user turn"),
        (
            m.TaskType.CHAT,
            '{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}',
            r"^line 2, message 1: an assistant turn comes before any user turn",
        ),
        (m.TaskType.CHAT, '{"messages": [{"role": "robot", "content": "Q"}]}', r"^line 2, messages\[0\], field 'role'"),
        (m.TaskType.CHAT, '{"text": "plain"}', r"^line 2: not a conversation record"),
        (
            m.TaskType.CHAT,
            '{"prompt": "Q", "chosen": "A", "rejected": "B"}',
            r"^line 2: this is a preference record .* import it into a preference project",
        ),
        (m.TaskType.PREFERENCE, '{"prompt": "Q", "candidates": ["A", "A"]}', r"^line 2, field 'candidates': a pref"),
        (
            m.TaskType.PREFERENCE,
            '{"prompt": "Q", "chosen": "Same", "rejected": "Same "}',
            r"^line 2, fields 'chosen' and 'rejected': the same reply",
        ),
        (
            m.TaskType.PREFERENCE,
            '{"messages": [{"role": "user", "content": "Q"}]}',
            r"^line 2: a preference project needs candidate replies",
        ),
        (m.TaskType.CHAT, '{"id": 1.5, "messages": []}', r"^line 2, field 'id': must be a string or an integer"),
    ],
)
def test_a_bad_record_fails_the_import_naming_the_line_and_stores_nothing(
    make_generative: Any,
    import_jsonl: Any,
    service: LabelingService,
    task_type: m.TaskType,
    line: str,
    message: str,
) -> None:
    make_generative("p", task_type)
    good = (
        {"prompt": "Fine question", "candidates": ["one", "two"]}
        if task_type is m.TaskType.PREFERENCE
        else _openai("Fine question", "Fine answer")
    )
    with pytest.raises(InvalidArgumentError, match=message):
        import_jsonl("p", [good, line])
    assert service.get_project("", "p").stats.item_count == 0
    assert service.list_imports("", "p", offset=0, limit=10) == []
    assert import_jsonl("p", [good]).accepted_count == 1


def test_a_repeated_external_id_fails_the_import(make_generative: Any, import_jsonl: Any) -> None:
    make_generative()
    with pytest.raises(InvalidArgumentError, match=r"^line 2, field 'id': external id 'x' appears earlier"):
        import_jsonl("chat", [_openai("one question", record_id="x"), _openai("two question", record_id="x")])


def test_csv_into_a_chat_project_is_refused_before_reading(make_generative: Any, service: LabelingService) -> None:
    make_generative()
    with pytest.raises(InvalidArgumentError, match="conversations are imported from JSONL .*, not CSV"):
        service.begin_import("", m.ImportOptions("chat", m.ImportFormat.CSV))


def test_structured_items_are_checked_like_records(make_generative: Any, service: LabelingService) -> None:
    make_generative()
    session = service.begin_import("", m.ImportOptions("chat", m.ImportFormat.ITEMS))
    assert not isinstance(session, m.ImportReport)
    builder = session.builder
    try:
        with pytest.raises(InvalidArgumentError, match=r"^item 1: a chat project's items are conversations"):
            builder.build(1, "t", "plain text", (), {})
        bad = Conversation((ChatMessage(ASSISTANT, "A"), ChatMessage(USER, "Q")))
        with pytest.raises(InvalidArgumentError, match=r"^item 2, message 1: an assistant turn comes before"):
            builder.build_conversation(2, "b", bad, (), {}, "openai")
        with pytest.raises(InvalidArgumentError, match=r"^item 3, field 'candidates': candidate replies are for"):
            builder.build_conversation(3, "c", Conversation((ChatMessage(USER, "Q"),), ("a", "b")), (), {}, "openai")
        good = Conversation((ChatMessage(USER, "Q?"), ChatMessage(ASSISTANT, "A.")))
        session.feed_records([builder.build_conversation(4, "g", good, (), {"k": "v"}, "openai")])
    except BaseException:
        session.close()
        raise
    report = service.finish_import(session)
    assert (report.accepted_count, report.records_by_format) == (1, {"openai": 1})
    assert _by_id(service)["g"].conversation == good


def test_a_redelivered_import_is_answered_with_the_first_report(
    make_generative: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_generative()
    rows = [_openai("first question here", "first answer"), _openai("second question here", "second answer")]
    first = import_jsonl("chat", rows, request_id="upload-1", chunk=7)
    again = import_jsonl("chat", rows, request_id="upload-1")
    assert again == first and first.accepted_count == 2
    assert service.get_project("", "chat").stats.item_count == 2
