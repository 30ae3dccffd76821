"""Name rules: registered models, aliases and base models are validated slugs (see registry.proto)."""

from __future__ import annotations

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.core.tasks import CHAT, CLASSIFICATION_TASK_TYPES, task_type_enum_name

# Sequence classifiers: what an encoder base model can be fine-tuned into.
CLASSIFIER_TASKS = tuple(task_type_enum_name(name) for name in CLASSIFICATION_TASK_TYPES)
# Tasks a registered model (and its versions) may have: the classifiers and chat models (what SFT and DPO
# jobs publish; a preference dataset trains a chat model, so no model is a "preference" model). The others in
# common.v1.TaskType are marked "later" in the proto.
SUPPORTED_TASKS = (*CLASSIFIER_TASKS, task_type_enum_name(CHAT))
TASK_UNSPECIFIED = "TASK_TYPE_UNSPECIFIED"


def validate_model_name(name: str) -> str:
    return validate_id(name, what="registered model name")


def validate_base_model_name(name: str) -> str:
    return validate_id(name, what="base model name")


def validate_alias(alias: str) -> str:
    """An alias is a model-name slug that starts with a letter, so it never reads as a version number."""
    validate_id(alias, what="alias")
    if not alias[0].isalpha():
        raise InvalidArgumentError(f"alias {alias!r} must start with a letter (e.g. 'production', 'staging')")
    return alias


def validate_version_number(version: int) -> int:
    if version < 1:
        raise InvalidArgumentError(f"version must be a positive number (1, 2, ...), got {version}")
    return version


def validate_task(task: str, *, allow_unspecified: bool = True) -> str:
    if task == TASK_UNSPECIFIED and allow_unspecified:
        return task
    if task not in SUPPORTED_TASKS:
        raise InvalidArgumentError(
            f"task {task} is not supported by the registry yet; use one of {', '.join(SUPPORTED_TASKS)}"
        )
    return task


def validate_label_map(labels: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for label in labels:
        if not label or not label.strip():
            raise InvalidArgumentError("label map entries must not be empty")
        if label in seen:
            raise InvalidArgumentError(f"label map names {label!r} twice; each class name must be unique")
        seen.add(label)
    return labels


def validate_tags(tags: dict[str, str], *, what: str = "tag") -> dict[str, str]:
    for key, value in tags.items():
        if not key or len(key) > 128:
            raise InvalidArgumentError(f"{what} keys must be 1-128 characters, got {key[:40]!r}")
        if len(value) > 1024:
            raise InvalidArgumentError(f"{what} {key!r} has a value longer than 1024 characters")
    return tags


def validate_text(value: str, *, what: str, limit: int = 10_000) -> str:
    if len(value) > limit:
        raise InvalidArgumentError(f"{what} is {len(value)} characters long; the limit is {limit}")
    return value
