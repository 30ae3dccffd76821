"""Training reaches its objective through the task-type registry (gristmill.training.tasks)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.storage import ObjectStore
from gristmill.core.tasks import CHAT, PREFERENCE, TEXT_CLASSIFICATION
from gristmill.training.devtools import LABELS, sentiment_rows, write_dataset_version
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import BaseModelRef, DatasetRef
from gristmill.training.domain.resolve import DatasetCatalog
from gristmill.training.ml.loop import DirectorySession, LoopConfig, LoopRunner
from gristmill.training.tasks import TRAINING_TASKS, training_task
from gristmill.training.tasks.text_classification import LabelledText, TextClassification, classification_signature


def test_text_classification_chat_and_preference_have_objectives() -> None:
    assert TRAINING_TASKS.names() == (TEXT_CLASSIFICATION, CHAT, PREFERENCE)
    task = training_task(d.TaskType.TEXT_CLASSIFICATION.value)
    assert isinstance(task, TextClassification)
    # An unset task (jobs and models recorded before task types) is text classification.
    assert training_task(d.TaskType.UNSPECIFIED.value) is task
    assert task.signature(LABELS) == classification_signature(len(LABELS))


@pytest.mark.parametrize("name", ["causal-lm", "TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION"])
def test_a_task_without_an_objective_is_refused_naming_what_training_supports(name: str) -> None:
    expected = "not supported by training yet; supported: text-classification, chat, preference$"
    with pytest.raises(InvalidArgumentError, match=expected):
        training_task(name)


def _spy(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], task: Any, method: str) -> None:
    original: Callable[..., Any] = getattr(task, method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(task, method, spy)


def test_a_dataset_version_is_read_through_its_task(
    monkeypatch: pytest.MonkeyPatch, objects: ObjectStore, dataset: DatasetRef
) -> None:
    calls: Counter[str] = Counter()
    task = training_task(TEXT_CLASSIFICATION)
    for method in ("check_label_map", "examples"):
        _spy(monkeypatch, calls, task, method)
    resolved = DatasetCatalog(objects).resolve(dataset)
    assert resolved.task is d.TaskType.TEXT_CLASSIFICATION
    assert calls == Counter({"check_label_map": 1, "examples": 3})


def test_a_dataset_of_a_task_training_lacks_is_invalid_argument_naming_the_field(objects: ObjectStore) -> None:
    ref = write_dataset_version(
        objects,
        project_id="tickets",
        dataset_version_id="v1",
        label_map=LABELS,
        splits={"train": sentiment_rows(8, 1)},
        task_type="TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION",
    )
    with pytest.raises(InvalidArgumentError) as caught:
        DatasetCatalog(objects).resolve(ref)
    assert "tickets/v1 is a TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION dataset" in caught.value.message
    assert "not supported by training yet; supported: text-classification, chat, preference" in caught.value.message
    assert caught.value.details["field"] == "spec.dataset_version"


def test_a_spec_naming_a_task_without_an_objective_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="spec.task.*TASK_TYPE_CAUSAL_LM is not supported yet"):
        d.build_spec(
            display_name="t",
            base_model=BaseModelRef(local_path="/m"),
            dataset=DatasetRef("reviews", "v1"),
            task=d.TaskType.CAUSAL_LM,
            method=d.Method.FULL,
            lora=None,
            hyper_parameters=d.build_hyper_parameters(method=d.Method.FULL),
            resources=d.build_resources(),
            search=None,
            registered_model_name="",
            tags={},
        )


def _loop_config(task: str) -> LoopConfig:
    return LoopConfig(
        job_id="j",
        model_dir="/nowhere",
        label_map=tuple(LABELS),
        examples={"train": [LabelledText("good", 1)]},
        method=d.Method.FULL,
        lora=None,
        hyper=d.build_hyper_parameters(method=d.Method.FULL),
        task=task,
    )


def test_the_loop_takes_its_objective_from_the_job_task(tmp_path: Path) -> None:
    runner = LoopRunner(_loop_config("TASK_TYPE_TEXT_CLASSIFICATION"), 0, 1, 0, DirectorySession(tmp_path))
    assert runner.task is training_task(TEXT_CLASSIFICATION)
    with pytest.raises(InvalidArgumentError, match="'causal-lm' is not supported by training"):
        LoopRunner(_loop_config("causal-lm"), 0, 1, 0, DirectorySession(tmp_path))
