"""PredictionLogged events → new items (active learning), through the in-process bus."""

from __future__ import annotations

from typing import Any

import pytest

from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import Event, MemoryBroker, MemoryEventBus
from gristmill.core.events.topics import PREDICTION_LOGGED, platform_catalog
from gristmill.core.sql import Database
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.events.predictions import PredictionLogHandler
from gristmill.labeling.store.sql import SqlLabelingStore

CATALOG = platform_catalog()


def _event(text: str, *, project: str = "p1", uncertain: bool = True, request: str = "r1") -> Event:
    message = events_pb2.PredictionLogged(
        registered_model_name="sentiment",
        model_version=3,
        request_id=request,
        index_in_request=0,
        masked_text=text,
        predicted_label="pos",
        probabilities={"pos": 0.55, "neg": 0.45},
        uncertain=uncertain,
        labeling_project_id=project,
    )
    return Event.create(message, key="sentiment", source="serving", catalog=CATALOG)


@pytest.fixture
def deliver(database: Database, service: LabelingService, store: SqlLabelingStore) -> Any:
    bus = MemoryEventBus(MemoryBroker(), database=database)
    consumer = bus.subscribe([PREDICTION_LOGGED], "labeling-al-test", PredictionLogHandler(service, store, CATALOG))

    def run(*events: Event) -> int:
        for event in events:
            bus.publish(event)
        return consumer.poll_once(timeout_s=0.1)

    yield run
    bus.close()


def _items(service: LabelingService) -> list[m.Item]:
    return service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=50)


def test_uncertain_predictions_become_deduplicated_items_with_the_prediction(
    make_project: Any, deliver: Any, service: LabelingService
) -> None:
    make_project(active_learning=m.ActiveLearningSettings(import_uncertain_predictions=True))
    first = _event("is this   good or bad, mail a@b.io", request="r1")
    assert deliver(first, _event("Is this good or bad, mail a@b.io!", request="r2"), first) == 3
    (item,) = _items(service)
    # Cleaned like an import (whitespace, PII), the near duplicate and the redelivery changed nothing.
    assert item.text == "is this good or bad, mail [EMAIL]"
    assert item.source is m.ItemSource.PREDICTION_LOG
    assert item.external_id == "prediction:sentiment:3:r1:0"
    (prediction,) = item.predictions
    assert (prediction.model_name, prediction.model_version, prediction.labels) == ("sentiment", 3, ("pos",))
    assert prediction.probabilities == {"pos": 0.55, "neg": 0.45}
    filtered = service.list_items(
        "", "p1", statuses=[], source=m.ItemSource.PREDICTION_LOG, include_annotations=False, offset=0, limit=5
    )
    assert [i.item_id for i in filtered] == [item.item_id]


def test_confident_predictions_unknown_projects_and_disabled_projects_are_ignored(
    make_project: Any, deliver: Any, service: LabelingService
) -> None:
    make_project()  # active learning off by default
    make_project("p2", active_learning=m.ActiveLearningSettings(import_uncertain_predictions=True))
    consumed = deliver(
        _event("sure thing", uncertain=False, project="p2"),
        _event("for a project that is not here", project="elsewhere"),
        _event("project does not want these", project="p1"),
    )
    assert consumed == 3
    assert _items(service) == []
    assert service.get_project("", "p2").stats.item_count == 0
