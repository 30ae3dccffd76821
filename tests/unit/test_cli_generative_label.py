"""``gristmill label`` for chat and preference items, and ``items resolve``'s responses, without a platform: what the
annotator sees, how each answer is parsed (a refused one gets one line and the question again), and what is sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.cli.annotation_commands import parse_label, resolution
from gristmill.cli.answers import AnswerError, Decision, EndOfInput, ask
from gristmill.cli.conversations import (
    ReplyChoice,
    ask_chat,
    ask_conversation,
    chat_response,
    chat_task_lines,
    consensus_text,
    conversation_lines,
    conversation_of,
    item_summary,
    parse_flags,
    parse_preference,
    parse_ranking,
    parse_rating,
    parse_reply_choice,
    preference_task_lines,
    read_reply,
    reply_from_lines,
    response_text,
)
from gristmill.cli.labeling_commands import PROJECT_TASKS, create_project_request, project_task_type
from gristmill.core.chat import ASSISTANT, SYSTEM, TOOL, USER, ChatMessage, Conversation

CHAT = Conversation(
    (
        ChatMessage(SYSTEM, "You are terse."),
        ChatMessage(USER, "How do I list files?\nOn Linux."),
        ChatMessage(ASSISTANT, "Use ls."),
    )
)
UNANSWERED = Conversation((ChatMessage(USER, "Say hi"),))
PREFERENCE = Conversation((ChatMessage(USER, "Name a colour"),), ("red", "blue", "green"))


class Terminal:
    """Scripted input lines and everything shown, for the question flows."""

    def __init__(self, *lines: str) -> None:
        self._lines: Iterator[str] = iter(lines)
        self.shown: list[str] = []

    def read_line(self) -> str | None:
        return next(self._lines, None)

    def out(self, message: str = "", nl: bool = True) -> None:
        self.shown.append(message)


# --------------------------------------------------------------------------- preference answers


@pytest.mark.parametrize(
    ("answer", "ranking"),
    [("2", [1]), ("2>1>3", [1, 0, 2]), (" 3 > 1 ", [2, 0]), ("1>2>3", [0, 1, 2])],
)
def test_a_preference_answer_is_a_ranking_numbered_from_one_sent_from_zero(answer: str, ranking: list[int]) -> None:
    response = parse_preference(answer, 3)
    assert isinstance(response, lb.Response) and list(response.ranking) == ranking and not response.tie


def test_tie_skip_and_quit() -> None:
    assert parse_preference("t", 3) == lb.Response(tie=True)
    assert parse_preference("TIE", 3) == lb.Response(tie=True)
    assert parse_preference("s", 3) is Decision.SKIP
    assert parse_preference(" q ", 3) is Decision.QUIT


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("", "answer the best candidate's number (1-3), a ranking such as 2>1, t (tie), s or q"),
        ("4", "there is no candidate 4: the candidates are 1-3"),
        ("0", "there is no candidate 0: the candidates are 1-3"),
        ("2>2", "candidate 2 appears twice in the ranking"),
        ("2>>1", "'2>>1' is not a ranking: candidate numbers separated by '>', best first (e.g. 2>1>3)"),
        ("2,1", "'2,1' is not a ranking: candidate numbers separated by '>', best first (e.g. 2>1>3)"),
        ("best", "'best' is not a ranking: candidate numbers separated by '>', best first (e.g. 2>1>3)"),
        ("-1", "'-1' is not a ranking: candidate numbers separated by '>', best first (e.g. 2>1>3)"),
    ],
)
def test_a_bad_preference_answer_says_what_would_do_in_one_line(answer: str, message: str) -> None:
    with pytest.raises(AnswerError) as refused:
        parse_preference(answer, 3)
    assert str(refused.value) == message and "\n" not in message


def test_a_ranking_without_the_item_is_bounded_by_the_most_candidates_an_item_can_have() -> None:
    assert parse_ranking("16>1") == [15, 0]
    with pytest.raises(AnswerError, match="there is no candidate 99999999999: an item has at most 16"):
        parse_ranking("99999999999")


# --------------------------------------------------------------------------- chat answers


def test_the_reply_choice() -> None:
    assert parse_reply_choice("", has_reply=True) is ReplyChoice.KEEP
    assert parse_reply_choice(" E ", has_reply=True) is ReplyChoice.EDIT
    assert parse_reply_choice("e", has_reply=False) is ReplyChoice.EDIT
    assert parse_reply_choice("s", has_reply=True) is Decision.SKIP
    assert parse_reply_choice("quit", has_reply=False) is Decision.QUIT
    with pytest.raises(AnswerError, match="^press Enter to keep the reply, e to edit it, s to skip or q to quit$"):
        parse_reply_choice("x", has_reply=True)
    with pytest.raises(AnswerError, match="^there is no reply to keep: e writes one, s skips, q quits$"):
        parse_reply_choice("", has_reply=False)


def test_ratings_and_flags() -> None:
    assert [parse_rating(a) for a in ("", " ", "1", " 5 ")] == [0, 0, 1, 5]
    for bad in ("0", "6", "x", "4.5", "-1", "\u0661"):
        with pytest.raises(AnswerError, match="^rate 1-5, or press Enter to leave the reply unrated$"):
            parse_rating(bad)
    assert parse_flags("") == []
    assert parse_flags("Unsafe, wrong,,unsafe") == ["unsafe", "wrong"]
    assert parse_flags("off-topic") == ["off-topic"]
    with pytest.raises(
        AnswerError, match="^'rude' is not a flag; flags: unsafe, wrong, off-topic \\(or Enter: none\\)$"
    ):
        parse_flags("wrong, rude")


def test_a_new_reply_is_the_lines_up_to_a_lone_dot() -> None:
    assert reply_from_lines(["", "First line.", "  indented", ""]) == "First line.\n  indented"
    with pytest.raises(AnswerError, match="the new reply is empty"):
        reply_from_lines(["  ", ""])
    term = Terminal("Line one", "", "Line three", " . ", "after")
    assert read_reply(term.read_line, term.out) == "Line one\n\nLine three"
    assert term.read_line() == "after"  # nothing read past the dot
    with pytest.raises(EndOfInput):
        read_reply(Terminal("unfinished").read_line, Terminal().out)


def test_what_a_chat_answer_sends() -> None:
    # Kept and rated or flagged: '' keeps the item's own reply.
    assert chat_response("Use ls.", None, 4, []) == lb.Response(rating=4)
    assert chat_response("Use ls.", None, 0, ["wrong"]) == lb.Response(flags=["wrong"])
    # Kept, unrated, unflagged: the service needs something, so the reply is accepted as written.
    assert chat_response("Use ls.", None, 0, []) == lb.Response(reply="Use ls.")
    assert chat_response("Use ls.", "Run `ls -l`.", 2, ["wrong"]) == lb.Response(
        reply="Run `ls -l`.", rating=2, flags=["wrong"]
    )


def test_ask_chat_keep_rate_and_flag() -> None:
    term = Terminal("", "4", "")
    assert ask_chat(CHAT, term.read_line, term.out) == lb.Response(rating=4)
    assert term.shown == [
        "> ",
        "  rating 1-5 (Enter: unrated)> ",
        "  flags, comma-separated: unsafe, wrong, off-topic (Enter: none)> ",
    ]


def test_ask_chat_edit_over_several_lines_with_answers_asked_again() -> None:
    term = Terminal("x", "e", "Run:", "  ls -l", ".", "9", "3", "rude", "wrong")
    response = ask_chat(CHAT, term.read_line, term.out)
    assert response == lb.Response(reply="Run:\n  ls -l", rating=3, flags=["wrong"])
    errors = [line for line in term.shown if line.startswith("  ") and not line.rstrip().endswith(">")]
    assert errors == [
        "  press Enter to keep the reply, e to edit it, s to skip or q to quit",
        "  the new reply; end it with a line holding only '.':",
        "  rate 1-5, or press Enter to leave the reply unrated",
        "  'rude' is not a flag; flags: unsafe, wrong, off-topic (or Enter: none)",
    ]


def test_ask_chat_an_empty_new_reply_asks_again_and_the_end_of_input_stops() -> None:
    term = Terminal("e", ".", "s")
    assert ask_chat(CHAT, term.read_line, term.out) is Decision.SKIP
    assert "  the new reply is empty; answer again" in term.shown
    with pytest.raises(EndOfInput):
        ask_chat(CHAT, Terminal("", "5").read_line, Terminal().out)  # no flags answer: nothing is sent


def test_a_chat_item_without_a_reply_must_get_one_written() -> None:
    term = Terminal("", "e", "Hi!", ".", "", "")
    assert ask_chat(UNANSWERED, term.read_line, term.out) == lb.Response(reply="Hi!")
    assert "  there is no reply to keep: e writes one, s skips, q quits" in term.shown


# --------------------------------------------------------------------------- what the annotator sees


def test_a_chat_task_shows_the_turns_then_the_reply() -> None:
    assert chat_task_lines(CHAT, 5) == [
        "\n[5 left]",
        "  system: You are terse.",
        "  user: How do I list files?",
        "        On Linux.",
        "  reply: Use ls.",
        "  Enter) keep the reply  e) edit it  s) skip  q) quit",
    ]
    assert chat_task_lines(UNANSWERED, 1)[-2:] == [
        "  (no assistant reply yet)",
        "  e) write the reply  s) skip  q) quit",
    ]


def test_a_system_turn_is_dimmed_on_a_terminal_only() -> None:
    styled = chat_task_lines(CHAT, 5, styled=True)
    assert styled[1] == typer.style("  system: You are terse.", dim=True) != "  system: You are terse."
    assert styled[2] == "  user: How do I list files?"


def test_a_preference_task_numbers_the_candidates_from_one() -> None:
    assert preference_task_lines(PREFERENCE, 2) == [
        "\n[2 left]",
        "  user: Name a colour",
        "  candidate 1: red",
        "  candidate 2: blue",
        "  candidate 3: green",
        "  1-3) the best  2>1) a ranking, best first  t) a tie  s) skip  q) quit",
    ]


def test_ask_conversation_shows_the_item_and_reads_the_answer() -> None:
    term = Terminal("5", "3>1")
    assert ask_conversation(PREFERENCE, 2, read_line=term.read_line, out=term.out) == lb.Response(ranking=[2, 0])
    assert "  there is no candidate 5: the candidates are 1-3" in term.shown
    chat = Terminal("q")
    assert ask_conversation(CHAT, 1, read_line=chat.read_line, out=chat.out) is Decision.QUIT
    assert "  reply: Use ls." in chat.shown


def test_tool_turns_show_who_and_the_calls() -> None:
    conversation = Conversation(
        (
            ChatMessage(USER, "Weather?"),
            ChatMessage(ASSISTANT, "", tool_calls='[{"id":"c1","function":{"name":"weather"}}]'),
            ChatMessage(TOOL, "12C", tool_call_id="c1"),
            ChatMessage(ASSISTANT, "It is 12C."),
        )
    )
    assert conversation_lines(conversation) == [
        "  user: Weather?",
        '  assistant: [calls tools] [{"id":"c1","function":{"name":"weather"}}]',
        "  tool (c1): 12C",
        "  assistant: It is 12C.",
    ]


def test_classification_answers_are_unchanged() -> None:
    labels = ["negative", "positive"]
    assert [parse_label(a, labels) for a in ("2", " negative ", "s", "Q")] == [
        "positive",
        "negative",
        Decision.SKIP,
        Decision.QUIT,
    ]
    term = Terminal("maybe", "3", "1")
    assert ask("> ", lambda a: parse_label(a, labels), term.read_line, term.out) == "negative"
    assert term.shown.count("  answer 1-2, a label name, s or q") == 2


# --------------------------------------------------------------------------- showing items and responses


def conversation_item(conversation: Conversation, consensus: list[str]) -> lb.Item:
    item = lb.Item(item_id="i1", consensus=lb.Consensus(labels=consensus))
    item.conversation.messages.extend(
        common_pb2.ChatMessage(role=m.role, content=m.content, tool_calls=m.tool_calls) for m in conversation.messages
    )
    item.conversation.candidates.extend(conversation.candidates)
    return item


def test_responses_items_and_consensus_for_people() -> None:
    assert response_text(lb.Response()) == ""
    assert response_text(lb.Response(ranking=[1])) == "best 2"
    assert response_text(lb.Response(ranking=[2, 0, 1])) == "ranking 3>1>2"
    assert response_text(lb.Response(tie=True)) == "tie"
    assert response_text(lb.Response(rating=4)) == "reply kept, rating 4"
    assert response_text(lb.Response(reply="Run\nls", flags=["unsafe", "wrong"])) == (
        "reply 'Run ls', unrated, flags unsafe,wrong"
    )
    preference = conversation_item(PREFERENCE, ["candidate-2"])
    assert consensus_text(preference) == "candidate 3" and item_summary(preference) == "Name a colour"
    assert conversation_of(preference.conversation) == PREFERENCE
    chat = conversation_item(CHAT, ["accepted"])
    assert consensus_text(chat) == "accepted" and item_summary(chat) == "How do I list files? On Linux."
    # A classification label that happens to look like a choice is shown as it is.
    assert consensus_text(lb.Item(text="x", consensus=lb.Consensus(labels=["candidate-1"]))) == "candidate-1"


# --------------------------------------------------------------------------- items resolve, projects create


def test_resolve_takes_labels_or_a_chat_or_a_preference_response() -> None:
    assert resolution("a, b", None, None, [], "", False) == (["a", "b"], None)
    assert resolution("", "Better.", 5, ["wrong"], "", False) == (
        [],
        lb.Response(reply="Better.", rating=5, flags=["wrong"]),
    )
    assert resolution("", None, 2, [], "", False) == ([], lb.Response(rating=2))
    assert resolution("", None, None, [], "2>1", False) == ([], lb.Response(ranking=[1, 0]))
    assert resolution("", None, None, [], "", True) == ([], lb.Response(tie=True))


@pytest.mark.parametrize(
    "options",
    [
        ("", None, None, [], "", False),  # nothing
        ("a", "reply", None, [], "", False),  # labels and a reply
        ("", "reply", None, [], "2", False),  # chat and preference
        ("", None, None, [], "2", True),  # a ranking and a tie
        ("", None, None, [], "2>x", False),  # a bad ranking
        ("", None, None, ["rude"], "", False),  # an unknown flag
    ],
)
def test_resolve_refuses_a_mixed_or_bad_verdict_as_a_usage_error(options: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises(typer.Exit) as refused:
        resolution(*options)
    assert refused.value.exit_code == 2


def test_projects_create_task_types() -> None:
    assert list(PROJECT_TASKS) == ["text-classification", "text-multi-label-classification", "chat", "preference"]
    assert project_task_type("chat", multi_label=False, labels=[]) == common_pb2.TASK_TYPE_CHAT
    assert project_task_type("preference", multi_label=False, labels=[]) == common_pb2.TASK_TYPE_PREFERENCE
    # Labels for a chat project go to the service, which refuses them.
    assert project_task_type("chat", multi_label=False, labels=["a"]) == common_pb2.TASK_TYPE_CHAT
    assert project_task_type("", multi_label=True, labels=["a"]) == common_pb2.TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION
    request = create_project_request("Chats", [], task="chat")
    assert request.task_type == common_pb2.TASK_TYPE_CHAT and not request.labels
    for task, multi_label, labels in [("", False, []), ("summaries", False, ["a"]), ("chat", True, [])]:
        with pytest.raises(typer.Exit) as refused:
            project_task_type(task, multi_label=multi_label, labels=labels)
        assert refused.value.exit_code == 2
