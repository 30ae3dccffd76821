"""Serving's task types: which runtime loads a model version, chosen by the version's task type.

The registry records each version's task type (``ModelVersion.task``, the download manifest's ``task``,
the model manifest's ``task_type``); ``TaskRuntimeLoader`` is the ``ModelLoader`` that hands a fetched
version to the runtime registered for it. A task type is one module here implementing ``ServingTask``,
registered below. Implementations import their runtime (torch, transformers) only when they load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gristmill.core.errors import FailedPreconditionError, GristmillError
from gristmill.core.tasks import CHAT, TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION, TaskRegistry
from gristmill.serving.domain.generation import EngineLimits, GenerativeModel
from gristmill.serving.domain.sources import Classifier, LoadOptions, ResolvedVersion


class ServingTask(Protocol):
    """What serving needs from a task type."""

    @property
    def name(self) -> str: ...

    def prepare(self) -> None:
        """Import the runtime's libraries (at service start: a load then measures only its model's memory)."""
        ...

    def load(
        self, directory: Path, resolved: ResolvedVersion, options: LoadOptions, *, trace: bool, limits: EngineLimits
    ) -> Classifier | GenerativeModel:
        """The warmed-up runtime for the version fetched into ``directory``. Blocks: call it off the event loop.
        ``trace``: a classifier may run as a TorchScript trace; ``limits``: a generator's continuous batcher."""
        ...


SERVING_TASKS: TaskRegistry[ServingTask] = TaskRegistry("serving")


def serving_task(resolved: ResolvedVersion, *, error: type[GristmillError] = FailedPreconditionError) -> ServingTask:
    """The runtime for a resolved version's task type (unset is text classification).

    A version whose task type has no runtime here is a ``FailedPreconditionError`` (the version exists and
    is valid; this service cannot serve it) naming the version and the task types that can be served.
    """
    try:
        return SERVING_TASKS.get(resolved.task, error=error)
    except GristmillError as exc:
        raise type(exc)(
            f"version {resolved.version} of {resolved.registered_model_name} cannot be served: {exc.message}",
            details=exc.details,
        ) from None


class TaskRuntimeLoader:
    """The ``ModelLoader`` of the service: each version is loaded by the runtime of its task type."""

    def __init__(self, *, trace: bool = True, generation_limits: EngineLimits | None = None) -> None:
        # Whether runtimes may trace their forward pass (TorchScript) after loading.
        self.trace = trace
        # The continuous batcher's limits of every generative base model this loader loads.
        self.generation_limits = generation_limits or EngineLimits()
        for name in SERVING_TASKS.names():
            SERVING_TASKS.get(name).prepare()

    def __call__(
        self, directory: Path, resolved: ResolvedVersion, options: LoadOptions
    ) -> Classifier | GenerativeModel:
        return serving_task(resolved).load(
            directory, resolved, options, trace=self.trace, limits=self.generation_limits
        )


def _register() -> None:
    from gristmill.serving.tasks.chat import ChatGeneration
    from gristmill.serving.tasks.text_classification import TextClassification

    SERVING_TASKS.register(TEXT_CLASSIFICATION, TextClassification(TEXT_CLASSIFICATION))
    SERVING_TASKS.register(TEXT_MULTI_LABEL_CLASSIFICATION, TextClassification(TEXT_MULTI_LABEL_CLASSIFICATION))
    SERVING_TASKS.register(CHAT, ChatGeneration())


_register()
