"""The task-type vocabulary and the per-service plug-in registry (gristmill.core.tasks)."""

from __future__ import annotations

from typing import Protocol

import grpc
import pytest

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.tasks import (
    CHAT,
    DEFAULT_TASK_TYPE,
    PREFERENCE,
    TASK_TYPES,
    TEXT_CLASSIFICATION,
    TEXT_MULTI_LABEL_CLASSIFICATION,
    TaskRegistry,
    task_type_enum_name,
    task_type_name,
)


class Greeter(Protocol):
    def greet(self) -> str: ...


class Classifying:
    def greet(self) -> str:
        return "hello, classes"


def test_names_and_enum_names_are_one_vocabulary() -> None:
    assert {TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION, CHAT, PREFERENCE} <= set(TASK_TYPES)
    assert task_type_name("text-classification") == TEXT_CLASSIFICATION
    assert task_type_name("TASK_TYPE_TEXT_CLASSIFICATION") == TEXT_CLASSIFICATION
    assert task_type_name("TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION") == TEXT_MULTI_LABEL_CLASSIFICATION
    assert task_type_name("TASK_TYPE_CHAT") == CHAT
    assert task_type_enum_name(TEXT_CLASSIFICATION) == "TASK_TYPE_TEXT_CLASSIFICATION"
    assert task_type_enum_name("preference") == "TASK_TYPE_PREFERENCE"
    for name in TASK_TYPES:
        assert task_type_name(task_type_enum_name(name)) == name


@pytest.mark.parametrize("unset", ["", "TASK_TYPE_UNSPECIFIED"])
def test_an_unset_task_type_is_text_classification(unset: str) -> None:
    assert DEFAULT_TASK_TYPE == TEXT_CLASSIFICATION
    assert task_type_name(unset) == TEXT_CLASSIFICATION


@pytest.mark.parametrize("bad", ["summarise", "TASK_TYPE_SUMMARISE", "Text-Classification", "text_classification"])
def test_an_unknown_name_is_invalid_argument_listing_the_known_ones(bad: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        task_type_name(bad)
    assert caught.value.grpc_code is grpc.StatusCode.INVALID_ARGUMENT
    assert repr(bad) in caught.value.message
    for name in TASK_TYPES:
        assert name in caught.value.message


def test_registry_registers_and_looks_up_by_either_spelling() -> None:
    registry: TaskRegistry[Greeter] = TaskRegistry("greeting")
    implementation = Classifying()
    assert registry.register(TEXT_CLASSIFICATION, implementation) is implementation
    assert registry.get("text-classification") is implementation
    assert registry.get("TASK_TYPE_TEXT_CLASSIFICATION") is implementation
    assert registry.get("") is implementation
    assert registry.names() == (TEXT_CLASSIFICATION,)
    assert TEXT_CLASSIFICATION in registry
    assert CHAT not in registry
    assert "nonsense" not in registry


def test_registering_twice_or_an_unknown_name_is_refused() -> None:
    registry: TaskRegistry[Greeter] = TaskRegistry("greeting")
    registry.register(TEXT_CLASSIFICATION, Classifying())
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("TASK_TYPE_TEXT_CLASSIFICATION", Classifying())
    with pytest.raises(InvalidArgumentError, match="not a known task type"):
        registry.register("summarise", Classifying())


def test_a_known_but_unimplemented_task_names_the_service_and_what_it_supports() -> None:
    registry: TaskRegistry[Greeter] = TaskRegistry("greeting")
    registry.register(TEXT_CLASSIFICATION, Classifying())
    with pytest.raises(InvalidArgumentError) as caught:
        registry.get(CHAT)
    message = caught.value.message
    assert "'chat' is not supported by greeting" in message
    assert "supported: text-classification" in message
    assert caught.value.details == {"task-type": CHAT}
    # Stored data naming a task this build cannot handle is a precondition, not a bad request.
    with pytest.raises(FailedPreconditionError, match="'preference' is not supported by greeting"):
        registry.get("TASK_TYPE_PREFERENCE", error=FailedPreconditionError)
    with pytest.raises(InvalidArgumentError, match="spec.task 'summarise' is not a known task type"):
        registry.get("summarise", what="spec.task")
