"""FeedbackRecorded events → review items, accepted SFT answers and preference pairs, through the in-process bus."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gristmill.api.events.v1 import events_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.core.chat import ChatMessage, Conversation, FeedbackKind
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.events import Event, MemoryBroker, MemoryEventBus, dead_letter_topic
from gristmill.core.events.topics import FEEDBACK_RECORDED, LABELING_FEEDBACK, platform_catalog
from gristmill.core.sql import Database
from gristmill.labeling.api import convert
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.feedback import Feedback, Generation, Target, feedback_items
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.events.feedback import FeedbackHandler
from gristmill.labeling.store.rows import settings_from_json, settings_to_json
from gristmill.labeling.store.sql import SqlLabelingStore

CATALOG = platform_catalog()
CHAT = "support-chat"
PREFERENCE = "support-pairs"
SYSTEM = events_pb2.ChatTurn(role="system", content="You are the shop's assistant.")
QUESTION = events_pb2.ChatTurn(role="user", content="Where is my order 1234?")
REPLY = "It shipped yesterday."


def _generation(
    *,
    request: str = "req-1",
    project: str = CHAT,
    messages: list[events_pb2.ChatTurn] | None = None,
    reply: str = REPLY,
) -> events_pb2.GenerationLogged:
    return events_pb2.GenerationLogged(
        organization_id="",
        request_id=request,
        registered_model_name="support-bot",
        model_version=4,
        deployment_name="support-bot-prod",
        messages=messages if messages is not None else [SYSTEM, QUESTION],
        reply=reply,
        sampling_parameters={"temperature": "0.7", "seed": "11"},
        labeling_project_id=project,
    )


def _event(
    kind: events_pb2.FeedbackKind.ValueType,
    *,
    request: str = "req-1",
    generation: events_pb2.GenerationLogged | None = None,
    **fields: Any,
) -> Event:
    message = events_pb2.FeedbackRecorded(
        request_id=request, kind=kind, generation=generation or _generation(request=request), **fields
    )
    return Event.create(message, key="support-bot", source="serving", catalog=CATALOG)


@dataclass
class Bus:
    broker: MemoryBroker
    deliver_all: Any


@pytest.fixture
def bus(database: Database, service: LabelingService, store: SqlLabelingStore) -> Iterator[Bus]:
    broker = MemoryBroker()
    events = MemoryEventBus(broker, database=database)
    consumer = events.subscribe(
        list(LABELING_FEEDBACK.topics), "labeling-feedback-test", FeedbackHandler(service, store, CATALOG)
    )

    def deliver(*batch: Event) -> int:
        for event in batch:
            events.publish(event)
        consumed = 0
        while count := consumer.poll_once(timeout_s=0.05):
            consumed += count
        return consumed

    yield Bus(broker, deliver)
    events.close()


def _project(
    service: LabelingService,
    project_id: str,
    task_type: m.TaskType,
    feedback: m.FeedbackSettings | None = None,
    annotations_per_item: int = 1,
) -> m.Project:
    return service.create_project(
        "",
        project_id=project_id,
        display_name=project_id,
        description="",
        task_type=task_type,
        labels=[],
        settings=m.ProjectSettings(
            annotations_per_item=annotations_per_item, feedback=feedback or m.FeedbackSettings()
        ),
    )


def _chat_project(service: LabelingService, *, pairs: bool = True, **settings: Any) -> m.Project:
    feedback = m.FeedbackSettings(import_feedback=True, preference_project_id=PREFERENCE if pairs else "")
    return _project(service, CHAT, m.TaskType.CHAT, feedback, **settings)


def _items(service: LabelingService, project_id: str) -> list[m.Item]:
    return service.list_items("", project_id, statuses=[], source=None, include_annotations=True, offset=0, limit=50)


def _turns(conversation: Conversation | None) -> list[tuple[str, str]]:
    assert conversation is not None
    return [(message.role, message.content) for message in conversation.messages]


# --------------------------------------------------------------------------- the rules


def test_a_thumbs_down_becomes_a_chat_item_to_review(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    assert bus.deliver_all(_event(events_pb2.FEEDBACK_KIND_THUMBS_DOWN)) == 1
    (item,) = _items(service, CHAT)
    assert _turns(item.conversation) == [
        ("system", "You are the shop's assistant."),
        ("user", "Where is my order 1234?"),
        ("assistant", REPLY),
    ]
    assert item.source is m.ItemSource.FEEDBACK and item.status is m.ItemStatus.UNLABELED
    assert item.annotations == ()
    assert item.external_id == "feedback:req-1:review"
    assert item.metadata == {
        "request_id": "req-1",
        "model": "support-bot",
        "model_version": "4",
        "feedback_kind": "thumbs_down",
    }
    # The review queue offers it like any item.
    task, _ = service.next_task("", CHAT, "reviewer-1", None)
    assert task is not None and task.item.item_id == item.item_id


def test_low_ratings_are_reviewed_higher_ones_and_praise_store_nothing(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    consumed = bus.deliver_all(
        _event(events_pb2.FEEDBACK_KIND_RATING, rating=2, request="low"),
        _event(events_pb2.FEEDBACK_KIND_RATING, rating=3, request="fine"),
        _event(events_pb2.FEEDBACK_KIND_RATING, rating=5, request="great"),
        _event(events_pb2.FEEDBACK_KIND_THUMBS_UP, request="up"),
        _event(events_pb2.FEEDBACK_KIND_TEXT, text="thanks!", request="comment"),
        Event.create(_generation(request="plain"), key="support-bot", source="serving", catalog=CATALOG),
    )
    assert consumed == 6
    (item,) = _items(service, CHAT)
    assert item.external_id == "feedback:low:review"
    assert item.metadata["feedback_kind"] == "rating" and item.metadata["rating"] == "2"


def test_the_review_threshold_is_the_projects(service: LabelingService, bus: Bus) -> None:
    feedback = m.FeedbackSettings(import_feedback=True, review_at_or_below_rating=4)
    _project(service, CHAT, m.TaskType.CHAT, feedback)
    bus.deliver_all(
        _event(events_pb2.FEEDBACK_KIND_RATING, rating=4, request="four"),
        _event(events_pb2.FEEDBACK_KIND_RATING, rating=5, request="five"),
    )
    assert [item.external_id for item in _items(service, CHAT)] == ["feedback:four:review"]


def test_an_edit_is_an_accepted_answer_and_a_pair_over_the_original(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    _project(service, PREFERENCE, m.TaskType.PREFERENCE)
    edited = "It shipped yesterday and arrives on Friday."
    assert bus.deliver_all(_event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply=edited)) == 1

    (item,) = _items(service, CHAT)
    assert _turns(item.conversation)[-1] == ("assistant", edited)
    assert item.external_id == "feedback:req-1:edit" and item.metadata["feedback_kind"] == "edit"
    (answer,) = item.annotations
    assert answer.annotator_id == "feedback" and answer.response == m.Response(reply=edited)
    assert answer.labels == ("accepted",)
    # One annotation per item: accepted at once.
    assert item.status is m.ItemStatus.LABELED and item.consensus.labels == ("accepted",)

    (pair,) = _items(service, PREFERENCE)
    assert pair.conversation is not None
    assert _turns(pair.conversation) == _turns(Conversation(pair.conversation.messages))
    assert [m.role for m in pair.conversation.messages] == ["system", "user"]
    assert _preferred(pair) == (edited, REPLY)
    assert pair.external_id == "feedback:req-1:pair" and pair.source is m.ItemSource.FEEDBACK
    (ranking,) = pair.annotations
    assert ranking.annotator_id == "feedback"
    assert pair.consensus.labels == (f"candidate-{ranking.response.ranking[0]}",)


def test_an_accepted_edit_publishes_an_sft_row_and_its_pair_a_dpo_row(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    _project(service, PREFERENCE, m.TaskType.PREFERENCE)
    edited = "It shipped yesterday; tracking is in your email."
    bus.deliver_all(_event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply=edited))
    rows = _published_rows(service, CHAT)
    assert [row["messages"][-1] for row in rows] == [{"role": "assistant", "content": edited}]
    pairs = _published_rows(service, PREFERENCE)
    assert [(row["chosen"], row["rejected"]) for row in pairs] == [
        ([{"role": "assistant", "content": edited}], [{"role": "assistant", "content": REPLY}])
    ]


def test_an_edit_waits_for_more_annotators_when_the_project_wants_them(service: LabelingService, bus: Bus) -> None:
    _chat_project(service, pairs=False, annotations_per_item=2)
    bus.deliver_all(_event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply="It arrives on Friday."))
    (item,) = _items(service, CHAT)
    assert len(item.annotations) == 1 and item.status is m.ItemStatus.UNLABELED
    # No preference project: no pair anywhere.
    assert service.get_project("", CHAT).stats.item_count == 1


def test_a_regenerate_is_a_pair_kept_over_discarded(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    _project(service, PREFERENCE, m.TaskType.PREFERENCE)
    bus.deliver_all(
        _event(
            events_pb2.FEEDBACK_KIND_REGENERATE,
            kept_reply="Order 1234 arrives on Friday.",
            discarded_reply=REPLY,
        )
    )
    assert _items(service, CHAT) == []
    (pair,) = _items(service, PREFERENCE)
    assert pair.conversation is not None
    assert _preferred(pair) == ("Order 1234 arrives on Friday.", REPLY)
    assert pair.metadata["feedback_kind"] == "regenerate"


def test_feedback_on_a_model_of_the_preference_project_goes_to_the_chat_project_that_feeds_it(
    service: LabelingService, bus: Bus
) -> None:
    # A DPO version's lineage names the preference project it learned from; its replies are reviewed in the
    # chat project whose feedback made those pairs, and its regenerates become more pairs there.
    _chat_project(service)
    _project(service, PREFERENCE, m.TaskType.PREFERENCE)
    dpo = _generation(project=PREFERENCE, request="dpo-1")
    bus.deliver_all(
        _event(events_pb2.FEEDBACK_KIND_THUMBS_DOWN, generation=dpo, request="dpo-1"),
        _event(
            events_pb2.FEEDBACK_KIND_REGENERATE,
            generation=_generation(project=PREFERENCE, request="dpo-2"),
            request="dpo-2",
            kept_reply="Order 1234 arrives on Friday.",
            discarded_reply=REPLY,
        ),
    )
    assert len(_items(service, CHAT)) == 1
    assert len(_items(service, PREFERENCE)) == 1


# --------------------------------------------------------------------------- idempotence and cleaning


def test_redelivery_and_repeated_feedback_create_nothing_new(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    _project(service, PREFERENCE, m.TaskType.PREFERENCE)
    edit = _event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply="It arrives on Friday.")
    down = _event(events_pb2.FEEDBACK_KIND_THUMBS_DOWN)
    # The same events twice (one event id each), then the same feedback again under new event ids.
    assert bus.deliver_all(edit, down, edit, down) == 4
    again = [
        _event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply="It arrives on Friday."),
        _event(events_pb2.FEEDBACK_KIND_THUMBS_DOWN),
    ]
    assert bus.deliver_all(*again) == 2
    chat = _items(service, CHAT)
    assert sorted(item.external_id for item in chat) == ["feedback:req-1:edit", "feedback:req-1:review"]
    assert [len(item.annotations) for item in chat if item.external_id.endswith(":edit")] == [1]
    (pair,) = _items(service, PREFERENCE)
    assert len(pair.annotations) == 1
    assert service.get_project("", CHAT).stats.annotation_count == 1


def test_every_turn_and_the_answer_are_masked_and_normalised(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    _project(service, PREFERENCE, m.TaskType.PREFERENCE)
    question = events_pb2.ChatTurn(role="user", content="Mail   me at jane.doe@example.com about\norder 1234")
    generation = _generation(messages=[SYSTEM, question], reply="Sure, I will write to jane.doe@example.com.")
    bus.deliver_all(
        _event(events_pb2.FEEDBACK_KIND_EDIT, generation=generation, edited_reply="  Call +1 415 555 0100 instead. ")
    )
    (item,) = _items(service, CHAT)
    assert _turns(item.conversation)[1:] == [
        ("user", "Mail me at [EMAIL] about\norder 1234"),
        ("assistant", "Call [PHONE] instead."),
    ]
    assert item.annotations[0].response.reply == "Call [PHONE] instead."
    assert "example.com" not in item.text and "555" not in item.text
    (pair,) = _items(service, PREFERENCE)
    assert pair.conversation is not None
    assert _preferred(pair) == ("Call [PHONE] instead.", "Sure, I will write to [EMAIL].")
    assert "example.com" not in pair.text


# --------------------------------------------------------------------------- what is ignored, and what is refused


def test_projects_that_cannot_take_feedback_are_skipped(service: LabelingService, bus: Bus, make_project: Any) -> None:
    _project(service, "off", m.TaskType.CHAT)  # feedback off by default
    make_project("classes", feedback=m.FeedbackSettings(import_feedback=True))  # not a chat project
    consumed = bus.deliver_all(
        *(
            _event(events_pb2.FEEDBACK_KIND_THUMBS_DOWN, generation=_generation(project=project), request=project)
            for project in ("off", "classes", "nowhere", "")
        )
    )
    assert consumed == 4
    assert service.get_project("", "off").stats.item_count == 0
    assert service.get_project("", "classes").stats.item_count == 0


def test_a_missing_or_wrong_preference_project_skips_only_the_pair(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)  # names PREFERENCE, which does not exist yet
    bus.deliver_all(_event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply="It arrives on Friday.", request="r1"))
    assert [item.external_id for item in _items(service, CHAT)] == ["feedback:r1:edit"]
    _project(service, PREFERENCE, m.TaskType.CHAT)  # not a preference project
    bus.deliver_all(_event(events_pb2.FEEDBACK_KIND_REGENERATE, kept_reply="A", discarded_reply="B", request="r2"))
    assert _items(service, PREFERENCE) == []


def test_feedback_that_cannot_make_its_item_is_dead_lettered(service: LabelingService, bus: Bus) -> None:
    _chat_project(service)
    bad = [
        _event(events_pb2.FEEDBACK_KIND_EDIT, edited_reply="   ", request="empty-edit"),
        _event(events_pb2.FEEDBACK_KIND_RATING, rating=9, request="rating-9"),
        _event(events_pb2.FEEDBACK_KIND_THUMBS_DOWN, generation=_generation(messages=[]), request="no-messages"),
    ]
    assert bus.deliver_all(*bad) == 3
    assert len(bus.broker.records(dead_letter_topic(FEEDBACK_RECORDED))) == 3
    assert _items(service, CHAT) == []


def test_feedback_items_is_a_plain_function_of_the_feedback_and_the_settings() -> None:
    generation = Generation("r9", "bot", 1, (ChatMessage("user", "Hi"),), "Hello!", labeling_project_id=CHAT)
    pairs = m.FeedbackSettings(import_feedback=True, preference_project_id=PREFERENCE)
    edit = feedback_items(Feedback("", FeedbackKind.EDIT, generation, edited_reply="Hello, how can I help?"), pairs)
    assert [(item.target, item.external_id) for item in edit] == [
        (Target.CHAT, "feedback:r9:edit"),
        (Target.PREFERENCE, "feedback:r9:pair"),
    ]
    # An edit that changes nothing, or a regenerate of the same reply, prefers nothing.
    same = feedback_items(Feedback("", FeedbackKind.EDIT, generation, edited_reply=" Hello! "), pairs)
    assert [item.target for item in same] == [Target.CHAT]
    twice = Feedback("", FeedbackKind.REGENERATE, generation, kept_reply="Hello!", discarded_reply="Hello!")
    assert feedback_items(twice, pairs) == []
    # No preference project: a regenerate stores nothing.
    regenerate = Feedback("", FeedbackKind.REGENERATE, generation, kept_reply="Hey", discarded_reply="Hello!")
    assert feedback_items(regenerate, m.FeedbackSettings(import_feedback=True)) == []
    # A thumbs-down on an empty reply leaves the conversation at its prompt (the reviewer writes the reply).
    empty = Generation("r10", "bot", 1, (ChatMessage("user", "Hi"),), "  ", labeling_project_id=CHAT)
    (review,) = feedback_items(Feedback("", FeedbackKind.THUMBS_DOWN, empty), pairs)
    assert review.conversation == Conversation((ChatMessage("user", "Hi"),))
    with pytest.raises(InvalidArgumentError, match="request_id"):
        feedback_items(Feedback("", FeedbackKind.THUMBS_DOWN, Generation("", "bot", 1, (), "x", CHAT)), pairs)


# --------------------------------------------------------------------------- settings


def test_feedback_settings_defaults_round_trip_and_validation(service: LabelingService) -> None:
    assert convert.settings_in(pb.ProjectSettings()).feedback == m.FeedbackSettings(review_at_or_below_rating=2)
    given = pb.ProjectSettings(
        feedback=pb.FeedbackSettings(
            import_feedback=True, preference_project_id=PREFERENCE, review_at_or_below_rating=3
        )
    )
    settings = convert.settings_in(given)
    assert settings.feedback == m.FeedbackSettings(True, PREFERENCE, 3)
    assert convert.settings_out(settings).feedback == given.feedback
    stored = settings_to_json(settings)
    assert settings_from_json(json.loads(json.dumps(stored))) == settings
    # A row written before feedback settings existed reads as the defaults (feedback off).
    del stored["feedback"]
    assert settings_from_json(stored).feedback == m.FeedbackSettings()

    project = _project(service, CHAT, m.TaskType.CHAT, settings.feedback)
    assert service.get_project("", CHAT).settings.feedback == project.settings.feedback == settings.feedback
    with pytest.raises(InvalidArgumentError, match="settings.feedback.preference_project_id"):
        _project(service, "bad-1", m.TaskType.CHAT, m.FeedbackSettings(preference_project_id="Not A Slug"))
    with pytest.raises(InvalidArgumentError, match="settings.feedback.review_at_or_below_rating must be 1-5"):
        _project(service, "bad-2", m.TaskType.CHAT, m.FeedbackSettings(review_at_or_below_rating=6))


def _published_rows(service: LabelingService, project_id: str) -> list[dict[str, Any]]:
    version, _ = service.publish_dataset_version(
        "",
        project_id,
        ratios=m.SplitRatios(train=1.0, validation=0.0, test=0.0),
        seed=1,
        strategy=m.SplitStrategy.RANDOM,
        description="",
    )
    rows: list[dict[str, Any]] = []
    for chunk in service.export_dataset("", project_id, version.dataset_version_id, [m.Split.TRAIN]):
        if chunk.file_name == "train.jsonl":
            rows += [json.loads(line) for line in chunk.data.decode().splitlines() if line]
    return rows


def _preferred(pair: m.Item) -> tuple[str, str]:
    """A two-candidate pair's (chosen, rejected) by the feedback annotator's ranking. The candidates' order
    itself is by hash, so that annotators reviewing the pair are not shown the chosen one first."""
    assert pair.conversation is not None
    (answer,) = pair.annotations
    (best,) = answer.response.ranking
    candidates = pair.conversation.candidates
    return candidates[best], candidates[1 - best]
