"""Task types and the objectives that train them: what a job optimises, named once for the spec, the resolver and
the task implementations (a leaf module: ``gristmill.training.tasks`` sits below the domain and imports it)."""

from __future__ import annotations

from enum import StrEnum


class TaskType(StrEnum):
    """The common.v1.TaskType enum names (also used in dataset and model manifests)."""

    UNSPECIFIED = "TASK_TYPE_UNSPECIFIED"
    TEXT_CLASSIFICATION = "TASK_TYPE_TEXT_CLASSIFICATION"
    TEXT_MULTI_LABEL_CLASSIFICATION = "TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION"
    TOKEN_CLASSIFICATION = "TASK_TYPE_TOKEN_CLASSIFICATION"
    IMAGE_CLASSIFICATION = "TASK_TYPE_IMAGE_CLASSIFICATION"
    CAUSAL_LM = "TASK_TYPE_CAUSAL_LM"
    CHAT = "TASK_TYPE_CHAT"
    PREFERENCE = "TASK_TYPE_PREFERENCE"


class Objective(StrEnum):
    """What a job optimises (training.v1.Objective); each trains the dataset versions of given task types."""

    CLASSIFY = "classify"
    SFT = "sft"
    DPO = "dpo"


# The task types each objective trains. A dataset version's task type names its objective when the spec
# names none; the registered ``gristmill.training.tasks`` implement the objectives that are available.
OBJECTIVE_TASK_TYPES: dict[Objective, frozenset[TaskType]] = {
    Objective.CLASSIFY: frozenset({TaskType.TEXT_CLASSIFICATION}),
    Objective.SFT: frozenset({TaskType.CHAT}),
    Objective.DPO: frozenset({TaskType.PREFERENCE}),
}


# Objectives whose models generate text (a LoRA adapter of a causal LM): the ones ``publish_merged`` and QLoRA
# apply to.
GENERATIVE_OBJECTIVES = frozenset({Objective.SFT, Objective.DPO})


# The task type of the model trained on a dataset version of a task type, where it is not the version's own: a
# preference version trains a chat model (the published manifest, the job's events and so the registry say so).
MODEL_TASK_TYPES: dict[TaskType, TaskType] = {TaskType.PREFERENCE: TaskType.CHAT}


def model_task_type(task: TaskType) -> TaskType:
    """The task type of the model a job on a ``task`` dataset version publishes."""
    return MODEL_TASK_TYPES.get(task, task)


def default_objective(task: TaskType) -> Objective | None:
    """The objective that trains ``task`` (unspecified: text classification); None when none does."""
    if task is TaskType.UNSPECIFIED:
        task = TaskType.TEXT_CLASSIFICATION
    return next((o for o, tasks in OBJECTIVE_TASK_TYPES.items() if task in tasks), None)


# Test metrics of JSON replies (ml/chat.py computes them; spec.py validates the keys). Defined here, below
# both, so that the scoring code does not import the spec module.
JSON_VALID_METRIC = "json_valid"
JSON_MATCH_METRIC_PREFIX = "json_match_"


def json_match_metric(key: str) -> str:
    """The test metric of one of ``spec.json_match_keys``."""
    return JSON_MATCH_METRIC_PREFIX + key
