"""Training's task types: the objective a job trains with, chosen by the dataset version's task type.

A task type is one module here implementing ``TrainingTask`` (``tasks.base``), registered below. It decides
what the loop is fed (examples from dataset rows), which model is built from the base (head, LoRA task), how
a batch is collated and what its loss is, what evaluation measures, what the published artifact holds and
the signature it declares. The Ray runner, the loop's schedule, checkpoints, early stopping and publishing stay
generic: an example, an encoded split and a batch are opaque to them.

- ``text-classification`` (objective ``classify``): ``text_classification.TextClassification``;
- ``chat`` (objective ``sft``): ``chat.ChatSft``;
- ``preference`` (objective ``dpo``): ``preference.PreferenceDpo``.

The service imports this package at start, so implementations import torch, transformers and peft only
inside the methods the training loop (in Ray workers) and the base-model inspection call.
"""

from __future__ import annotations

from gristmill.core.errors import GristmillError, InvalidArgumentError
from gristmill.core.tasks import CHAT, PREFERENCE, TEXT_CLASSIFICATION, TaskRegistry
from gristmill.training.domain.dpo import DpoSettings
from gristmill.training.tasks.base import EncodingError as EncodingError
from gristmill.training.tasks.base import Evaluation as Evaluation
from gristmill.training.tasks.base import ModelCardText as ModelCardText
from gristmill.training.tasks.base import TrainingBatch as TrainingBatch
from gristmill.training.tasks.base import TrainingTask as TrainingTask

TRAINING_TASKS: TaskRegistry[TrainingTask] = TaskRegistry("training")


def training_task(task_type: str, *, error: type[GristmillError] = InvalidArgumentError) -> TrainingTask:
    """The objective for a task type (a name or an enum name; unset means text classification)."""
    return TRAINING_TASKS.get(task_type, error=error)


def job_training_task(task_type: str, *, dpo: DpoSettings | None = None) -> TrainingTask:
    """The objective a job's training loop runs: ``training_task``'s, with the spec's settings of that objective
    (``spec.dpo`` for dpo; the registered task has the defaults)."""
    from gristmill.training.tasks.preference import PreferenceDpo

    task = training_task(task_type)
    if dpo is not None and isinstance(task, PreferenceDpo):
        return task.with_settings(dpo)
    return task


def _register() -> None:
    from gristmill.training.tasks.chat import ChatSft
    from gristmill.training.tasks.preference import PreferenceDpo
    from gristmill.training.tasks.text_classification import TextClassification

    TRAINING_TASKS.register(TEXT_CLASSIFICATION, TextClassification())
    TRAINING_TASKS.register(CHAT, ChatSft())
    TRAINING_TASKS.register(PREFERENCE, PreferenceDpo())


_register()
