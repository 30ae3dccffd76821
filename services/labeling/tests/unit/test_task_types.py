"""Labeling reaches its task-type behaviour through the registry (gristmill.labeling.tasks)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.tasks import CHAT, PREFERENCE, TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.importer import ImportSession
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.tasks import LABELING_TASKS, labeling_task
from gristmill.labeling.tasks.text_classification import TextClassification


def test_the_classification_and_generative_task_types_are_registered() -> None:
    assert LABELING_TASKS.names() == (TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION, CHAT, PREFERENCE)
    single = labeling_task(m.TaskType.TEXT_CLASSIFICATION)
    multi = labeling_task(m.TaskType.TEXT_MULTI_LABEL_CLASSIFICATION)
    assert isinstance(single, TextClassification) and not single.multi_label
    assert isinstance(multi, TextClassification) and multi.multi_label
    # Every enum value the domain has is a task type the registry implements.
    for task_type in m.TaskType:
        assert task_type.value in LABELING_TASKS


@pytest.mark.parametrize("name", ["token-classification", "TASK_TYPE_TOKEN_CLASSIFICATION"])
def test_a_reserved_task_type_is_refused_naming_what_labeling_supports(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="not supported by labeling yet; supported: text-classification"):
        labeling_task(name)


def _spy(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], task: Any, method: str) -> None:
    original: Callable[..., Any] = getattr(task, method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(task, method, spy)


def test_import_annotation_and_publish_go_through_the_project_task(
    monkeypatch: pytest.MonkeyPatch, make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    calls: Counter[str] = Counter()
    task = labeling_task(TEXT_CLASSIFICATION)
    for method in ("check_schema", "record_labels", "check_annotation", "dataset_row"):
        _spy(monkeypatch, calls, task, method)
    make_project(labels=("neg", "pos"))
    rows = [
        {"id": f"e{i}", "text": f"text number {i} " + "word " * i, "label": "pos" if i % 2 else "neg"} for i in range(8)
    ]
    rows.append({"id": "unlabeled", "text": "nobody has labeled this one yet"})
    assert import_jsonl("p1", rows).accepted_count == 9
    items = service.list_items("", "p1", statuses=(), source=None, include_annotations=False, offset=0, limit=100)
    item = next(item for item in items if item.external_id == "unlabeled")
    service.submit_annotation("", "p1", item.item_id, "ann-1", task_id="", labels=["pos"], spans=(), comment="")
    with pytest.raises(InvalidArgumentError, match="a single-label project takes exactly one label"):
        service.submit_annotation("", "p1", item.item_id, "ann-2", task_id="", labels=[], spans=(), comment="")
    version, _ = service.publish_dataset_version(
        "", "p1", ratios=m.SplitRatios(1.0, 0.0, 0.0), seed=1, strategy=m.SplitStrategy.RANDOM, description=""
    )
    assert calls["check_schema"] == 1
    assert calls["record_labels"] == 1
    assert calls["check_annotation"] == 2
    assert calls["dataset_row"] == sum(split.item_count for split in version.splits) == 9


def test_a_project_whose_task_this_build_lacks_is_a_failed_precondition(make_project: Any) -> None:
    project = dataclasses.replace(make_project(), task_type="TASK_TYPE_TOKEN_CLASSIFICATION")
    options = m.ImportOptions(project_id="p1", format=m.ImportFormat.JSONL)
    report = m.ImportReport("imp", "p1", "", datetime.now(UTC))
    with pytest.raises(FailedPreconditionError, match="'token-classification' is not supported by labeling"):
        ImportSession(project, options, import_id="imp", new_id=lambda: "x", report=report)
