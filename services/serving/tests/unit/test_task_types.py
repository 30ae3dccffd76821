"""Serving picks a version's runtime through the task-type registry (gristmill.serving.tasks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.core.errors import FailedPreconditionError
from gristmill.core.tasks import CHAT, TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION
from gristmill.serving.domain.generation import EngineLimits
from gristmill.serving.domain.model import DeploymentSpec, VersionSelector
from gristmill.serving.domain.sources import TASK_MULTI_LABEL, TASK_SINGLE_LABEL, LoadOptions, ResolvedVersion
from gristmill.serving.tasks import SERVING_TASKS, TaskRuntimeLoader, serving_task
from gristmill.serving.tasks.chat import ChatGeneration
from gristmill.serving.tasks.text_classification import TextClassification
from services.serving.tests.support import make_service

ORG = "default"


def test_classifiers_have_the_classifier_runtime_and_chat_the_generator() -> None:
    assert SERVING_TASKS.names() == (TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION, CHAT)
    for task in (TASK_SINGLE_LABEL, TASK_MULTI_LABEL, "", "TASK_TYPE_UNSPECIFIED"):
        assert isinstance(serving_task(ResolvedVersion("m", 1, task=task)), TextClassification)
    assert isinstance(serving_task(ResolvedVersion("m", 1, task="TASK_TYPE_CHAT")), ChatGeneration)


@pytest.mark.parametrize("task", ["TASK_TYPE_PREFERENCE", "preference", "TASK_TYPE_CAUSAL_LM"])
def test_a_version_of_a_task_without_a_runtime_is_a_failed_precondition(task: str) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        serving_task(ResolvedVersion("support-bot", 3, task=task))
    assert caught.value.grpc_code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.message.startswith("version 3 of support-bot cannot be served: task type")
    assert "not supported by serving yet; supported: text-classification" in caught.value.message


def test_the_loader_hands_each_version_to_the_runtime_of_its_task(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[tuple[str, bool, EngineLimits]] = []
    for name in SERVING_TASKS.names():
        task = SERVING_TASKS.get(name)

        def load(
            directory: Path,
            resolved: ResolvedVersion,
            options: LoadOptions,
            *,
            trace: bool,
            limits: EngineLimits,
            _n: str = name,
        ) -> Any:
            loads.append((_n, trace, limits))
            return f"runtime of {resolved.version}"

        monkeypatch.setattr(task, "load", load)
    limits = EngineLimits(max_sequences=4)
    loader = TaskRuntimeLoader(trace=False, generation_limits=limits)
    single: object = loader(Path("/m"), ResolvedVersion("m", 1, task=TASK_SINGLE_LABEL), LoadOptions())
    multi: object = loader(Path("/m"), ResolvedVersion("m", 2, task=TASK_MULTI_LABEL), LoadOptions())
    assert (single, multi) == ("runtime of 1", "runtime of 2")
    chat: object = loader(Path("/m"), ResolvedVersion("m", 3, task="TASK_TYPE_CHAT"), LoadOptions())
    assert chat == "runtime of 3"
    assert loads == [
        (TEXT_CLASSIFICATION, False, limits),
        (TEXT_MULTI_LABEL_CLASSIFICATION, False, limits),
        (CHAT, False, limits),
    ]
    with pytest.raises(FailedPreconditionError, match="'preference' is not supported by serving"):
        loader(Path("/m"), ResolvedVersion("m", 4, task="TASK_TYPE_PREFERENCE"), LoadOptions())


async def test_deploying_a_version_serving_has_no_runtime_for_is_refused_before_anything_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_service(tmp_path)
    env.source.add("bot", 1)
    resolve = env.source.resolve
    monkeypatch.setattr(
        env.source,
        "resolve",
        lambda *args: replace(resolve(*args), task="TASK_TYPE_PREFERENCE"),  # a preference "model"
    )
    await env.service.start()
    try:
        spec = DeploymentSpec(
            organization_id=ORG, name="bot", registered_model_name="bot", target=VersionSelector.of_version(1)
        )
        with pytest.raises(FailedPreconditionError, match="version 1 of bot cannot be served: task type 'preference'"):
            await env.service.create(spec, wait_until_ready=False, timeout_s=1)
        assert env.store.list_all() == []
        assert env.manager.count() == 0
        assert env.loader.loaded == []
    finally:
        await env.service.close()
        env.database.dispose()
