"""Chat and preference as labeling task types: what a valid response is, what it votes for, and what a
decided item publishes (SFT and DPO rows)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gristmill.core.chat import ASSISTANT, SYSTEM, USER, ChatMessage, Conversation
from gristmill.core.errors import InvalidArgumentError
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.splits import DatasetItem
from gristmill.labeling.tasks import labeling_task
from gristmill.labeling.tasks.preference import ranked_pairs

NOW = datetime(2026, 12, 3, tzinfo=UTC)
SCHEMA = m.LabelSchema("p", 1, (), NOW)
CHAT = labeling_task("chat")
PREFERENCE = labeling_task("preference")

DIALOGUE = Conversation(
    (
        ChatMessage(SYSTEM, "You answer briefly."),
        ChatMessage(USER, "What is the capital of France?"),
        ChatMessage(ASSISTANT, "Paris is the capital."),
    )
)
PROMPT = Conversation((ChatMessage(USER, "Say hello."),), ("Hello!", "Hi there.", "Go away."))


def _item(conversation: Conversation) -> m.Item:
    return m.Item(
        "i1",
        "p",
        "e1",
        conversation.to_json(),
        {},
        m.ItemStatus.UNLABELED,
        m.ItemSource.IMPORT,
        "imp",
        "",
        m.Consensus(),
        NOW,
        conversation=conversation,
    )


def _dataset_item(conversation: Conversation, labels: tuple[str, ...], *responses: m.Response) -> DatasetItem:
    return DatasetItem("i1", "e1", conversation.to_json(), labels, source="ITEM_SOURCE_IMPORT", responses=responses)


def test_a_chat_response_is_checked_and_votes_accepted_or_rejected() -> None:
    item = _item(DIALOGUE)
    labels, response = CHAT.check_response([], m.Response(reply="  Paris.  ", rating=5), SCHEMA, item, "")
    assert labels == ("accepted",) and response.reply == "Paris."
    assert CHAT.check_response([], m.Response(rating=2), SCHEMA, item, "")[0] == ("rejected",)
    flagged = m.Response(flags=("wrong", "unsafe"))
    labels, response = CHAT.check_response([], flagged, SCHEMA, item, "")
    assert labels == ("rejected",) and response.flags == ("unsafe", "wrong")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (m.Response(rating=6), "rating: 6 is out of range"),
        (m.Response(rating=-1), "rating: -1 is out of range"),
        (m.Response(flags=("rude",)), "'rude' is not a flag"),
        (m.Response(flags=("wrong", "wrong")), "a flag appears twice"),
        (m.Response(ranking=(0,)), "ranking and tie are for preference projects"),
        (m.Response(), "give a reply, a rating or a flag"),
    ],
)
def test_a_bad_chat_response_is_invalid_argument(response: m.Response, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        CHAT.check_response([], response, SCHEMA, _item(DIALOGUE), "")


def test_a_chat_item_without_a_reply_needs_one_written() -> None:
    item = _item(Conversation(DIALOGUE.messages[:2]))
    with pytest.raises(InvalidArgumentError, match="has no assistant reply yet; write one"):
        CHAT.check_response([], m.Response(rating=4), SCHEMA, item, "")
    assert CHAT.check_response([], m.Response(reply="Paris."), SCHEMA, item, "")[0] == ("accepted",)


def test_labels_are_refused_in_generative_projects() -> None:
    with pytest.raises(InvalidArgumentError, match="takes a response"):
        CHAT.check_response(["pos"], m.Response(rating=3), SCHEMA, _item(DIALOGUE), "")
    with pytest.raises(InvalidArgumentError, match="has no label schema"):
        PREFERENCE.check_schema([m.LabelDefinition("a"), m.LabelDefinition("b")])


def test_a_preference_response_chooses_ranks_or_ties() -> None:
    item = _item(PROMPT)
    assert PREFERENCE.check_response([], m.Response(ranking=(1,)), SCHEMA, item, "")[0] == ("candidate-1",)
    assert PREFERENCE.check_response([], m.Response(ranking=(0, 1, 2)), SCHEMA, item, "")[0] == ("candidate-0",)
    assert PREFERENCE.check_response([], m.Response(tie=True), SCHEMA, item, "")[0] == ("tie",)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (m.Response(ranking=(3,)), "3 is not a candidate; the item has candidates 0-2"),
        (m.Response(ranking=(1, 1)), "a candidate appears twice"),
        (m.Response(ranking=(0,), tie=True), "a ranking or a tie, not both"),
        (m.Response(), "choose the best candidate"),
        (m.Response(reply="x"), "reply, rating and flags are for chat projects"),
    ],
)
def test_a_bad_preference_response_is_invalid_argument(response: m.Response, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        PREFERENCE.check_response([], response, SCHEMA, _item(PROMPT), "")


def test_a_classification_project_refuses_a_response() -> None:
    task = labeling_task("text-classification")
    schema = m.LabelSchema("p", 1, (m.LabelDefinition("neg"), m.LabelDefinition("pos")), NOW)
    with pytest.raises(InvalidArgumentError, match="are for chat and preference projects"):
        task.check_response(["pos"], m.Response(rating=3), schema, None, "")
    assert task.check_response(["pos"], m.Response(), schema, None, "") == (("pos",), m.Response())


def test_an_accepted_chat_item_publishes_the_reply_most_annotators_gave() -> None:
    item = _dataset_item(
        DIALOGUE,
        ("accepted",),
        m.Response(reply="Paris.", rating=4),
        m.Response(rating=5),
        m.Response(reply="Paris.", rating=5),
        m.Response(flags=("wrong",)),
    )
    ready = CHAT.publishable(item)
    assert ready is not None
    assert ready.labels == ("source:import", "length:short")
    [line] = CHAT.dataset_lines(ready)
    row = json.loads(line)
    assert row["id"] == "i1"
    assert row["messages"][-1] == {"role": "assistant", "content": "Paris."}
    assert [turn["role"] for turn in row["messages"]] == ["system", "user", "assistant"]


def test_a_reviewers_reply_wins_and_a_rejected_item_publishes_nothing() -> None:
    resolved = DatasetItem(
        "i1",
        "e1",
        DIALOGUE.to_json(),
        ("accepted",),
        responses=(m.Response(reply="Paris."),),
        resolved_response=m.Response(reply="The capital of France is Paris."),
    )
    ready = CHAT.publishable(resolved)
    assert ready is not None
    assert json.loads(ready.text)["messages"][-1]["content"] == "The capital of France is Paris."
    assert CHAT.publishable(_dataset_item(DIALOGUE, ("rejected",), m.Response(flags=("unsafe",)))) is None


def test_a_ranking_expands_to_its_pairs() -> None:
    assert ranked_pairs((1,), 3) == [(1, 0), (1, 2)]
    assert ranked_pairs((2, 0), 3) == [(2, 0), (2, 1), (0, 1)]
    assert ranked_pairs((0, 1, 2), 3) == [(0, 1), (0, 2), (1, 2)]


def test_a_decided_preference_publishes_dpo_pairs_in_trls_conversational_shape() -> None:
    item = _dataset_item(PROMPT, ("candidate-1",), m.Response(ranking=(0,)), m.Response(ranking=(1, 0, 2)))
    ready = PREFERENCE.publishable(item)
    assert ready is not None
    rows = [json.loads(line) for line in PREFERENCE.dataset_lines(ready)]
    # The first annotation agreeing with the consensus (candidate 1 best) gives the ranking 1 > 0 > 2.
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("Hi there.", "Hello!"),
        ("Hi there.", "Go away."),
        ("Hello!", "Go away."),
    ]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Say hello."}]
    assert [r["pair"] for r in rows] == [0, 1, 2] and {r["id"] for r in rows} == {"i1"}
    assert PREFERENCE.publishable(_dataset_item(PROMPT, ("tie",), m.Response(tie=True))) is None
