"""Feedback on real Kafka: serving's FeedbackRecorded events, published to the broker, become a review item, an
accepted SFT answer and a preference pair in the labeling service's projects (read back over gRPC); the same
feedback published again changes nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.core.events import Event, KafkaEventBus
from gristmill.core.events.topics import platform_catalog
from gristmill.core.host import ServiceHost
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database

pytestmark = pytest.mark.integration

CATALOG = platform_catalog()
TIMEOUT_S = 60.0


async def test_feedback_events_on_kafka_become_items(host: ServiceHost, kafka_bootstrap: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    chat, pairs = f"it-feedback-chat-{run}", f"it-feedback-pairs-{run}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.server.port}") as channel:
        stub = pb_grpc.LabelingServiceStub(channel)
        await stub.CreateProject(
            pb.CreateProjectRequest(project_id=pairs, display_name=pairs, task_type=common_pb2.TASK_TYPE_PREFERENCE)
        )
        await stub.CreateProject(
            pb.CreateProjectRequest(
                project_id=chat,
                display_name=chat,
                task_type=common_pb2.TASK_TYPE_CHAT,
                settings=pb.ProjectSettings(
                    feedback=pb.FeedbackSettings(import_feedback=True, preference_project_id=pairs)
                ),
            )
        )

        def feedback(request: str, kind: events_pb2.FeedbackKind.ValueType, **fields: Any) -> Event:
            generation = events_pb2.GenerationLogged(
                request_id=request,
                registered_model_name=f"bot-{run}",
                model_version=2,
                messages=[events_pb2.ChatTurn(role="user", content="My card 4111 1111 1111 1111 was charged twice.")],
                reply="Sorry about that.",
                labeling_project_id=chat,
            )
            message = events_pb2.FeedbackRecorded(request_id=request, kind=kind, generation=generation, **fields)
            return Event.create(message, key=f"bot-{run}", source="serving", catalog=CATALOG)

        edit = "Sorry about that: the second charge is refunded within 5 days."
        publisher = KafkaEventBus(KafkaSettings(bootstrap_servers=kafka_bootstrap), database=_database(tmp_path))
        try:
            # One key, so one partition and in order: when the last one is handled, so are the others.
            for event in (
                feedback(f"edit-{run}", events_pb2.FEEDBACK_KIND_EDIT, edited_reply=edit),
                feedback(f"edit-{run}", events_pb2.FEEDBACK_KIND_EDIT, edited_reply=edit),  # again, new event id
                feedback(f"down-{run}", events_pb2.FEEDBACK_KIND_THUMBS_DOWN),
            ):
                publisher.publish(event)
            publisher.flush()
        finally:
            publisher.close()

        items = await _wait_for(stub, chat, 2)
        by_id = {item.external_id: item for item in items}
        assert sorted(by_id) == [f"feedback:down-{run}:review", f"feedback:edit-{run}:edit"]
        answered = by_id[f"feedback:edit-{run}:edit"]
        assert answered.source == pb.ITEM_SOURCE_FEEDBACK and answered.status == pb.ITEM_STATUS_LABELED
        assert answered.conversation.messages[-1].content == edit
        assert answered.conversation.messages[0].content == "My card [PAYMENT_CARD] was charged twice."
        (answer,) = answered.annotations
        assert answer.annotator_id == "feedback" and answer.response.reply == edit
        review = by_id[f"feedback:down-{run}:review"]
        assert review.status == pb.ITEM_STATUS_UNLABELED and not review.annotations
        (pair,) = await _wait_for(stub, pairs, 1)
        (best,) = pair.annotations[0].response.ranking
        candidates = list(pair.conversation.candidates)
        assert sorted(candidates) == sorted([edit, "Sorry about that."]) and candidates[best] == edit


async def _wait_for(stub: pb_grpc.LabelingServiceStub, project_id: str, count: int) -> list[pb.Item]:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        page = await stub.ListItems(
            pb.ListItemsRequest(project_id=project_id, include_annotations=True, source=pb.ITEM_SOURCE_FEEDBACK)
        )
        if len(page.items) >= count or time.monotonic() > deadline:
            assert len(page.items) == count, f"{project_id}: {len(page.items)} feedback items, expected {count}"
            return list(page.items)
        await asyncio.sleep(0.5)


def _database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'publisher.db'}")
    db.create_all()
    return db
