"""Task types: the axis that says what an item, an annotation, a dataset row, an objective and a runtime are.

A task type has one name everywhere (``text-classification``, ``chat``, ``preference``); the protos and
the stored manifests spell the same thing as a ``common.v1.TaskType`` enum name
(``TASK_TYPE_TEXT_CLASSIFICATION``), and ``task_type_name`` accepts either. Where a project, dataset,
job or model version names no task type (``TASK_TYPE_UNSPECIFIED`` or empty), it is
``text-classification``, the one task every record made before task types existed has.

Each service declares a ``Protocol`` for what it needs from a task type and keeps a ``TaskRegistry`` of
implementations keyed by name, so adding a task adds a module per service (registered in that service's
``tasks`` package), not a branch in every place that handles an item or a model::

    LABELING_TASKS: TaskRegistry[LabelingTask] = TaskRegistry("labeling")
    LABELING_TASKS.register(TEXT_CLASSIFICATION, TextClassification(multi_label=False))
    task = LABELING_TASKS.get(project.task_type)  # InvalidArgumentError naming the supported ones
"""

from __future__ import annotations

from typing import Generic, TypeVar

from gristmill.core.errors import GristmillError, InvalidArgumentError

TEXT_CLASSIFICATION = "text-classification"
TEXT_MULTI_LABEL_CLASSIFICATION = "text-multi-label-classification"
# The generative tasks: chat (conversations, SFT, served by generation) and preference (pairs, DPO).
CHAT = "chat"
PREFERENCE = "preference"
# Reserved in common.v1.TaskType as "later".
TOKEN_CLASSIFICATION = "token-classification"
IMAGE_CLASSIFICATION = "image-classification"
CAUSAL_LM = "causal-lm"

# Every task type name a request or a stored record may carry, whether or not a service implements it.
TASK_TYPES: tuple[str, ...] = (
    TEXT_CLASSIFICATION,
    TEXT_MULTI_LABEL_CLASSIFICATION,
    CHAT,
    PREFERENCE,
    TOKEN_CLASSIFICATION,
    IMAGE_CLASSIFICATION,
    CAUSAL_LM,
)
# What an unset task type means.
DEFAULT_TASK_TYPE = TEXT_CLASSIFICATION
# The task types whose models are sequence classifiers (one head, a label map, OIP probabilities).
CLASSIFICATION_TASK_TYPES: tuple[str, ...] = (TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION)

_ENUM_PREFIX = "TASK_TYPE_"
_UNSPECIFIED = "TASK_TYPE_UNSPECIFIED"


def task_type_name(value: str, *, what: str = "task type") -> str:
    """The task type's name for ``value``: a name (``chat``) or an enum name (``TASK_TYPE_CHAT``).

    Empty and ``TASK_TYPE_UNSPECIFIED`` mean ``DEFAULT_TASK_TYPE``. Anything else that is not a known task
    type is an ``InvalidArgumentError`` listing the known ones.
    """
    if value in ("", _UNSPECIFIED):
        return DEFAULT_TASK_TYPE
    name = value.removeprefix(_ENUM_PREFIX).lower().replace("_", "-") if value.startswith(_ENUM_PREFIX) else value
    if name not in TASK_TYPES:
        raise InvalidArgumentError(
            f"{what} {value[:80]!r} is not a known task type; known task types: {', '.join(TASK_TYPES)}",
            details={"task-type": value[:80]},
        )
    return name


def task_type_enum_name(value: str) -> str:
    """The ``common.v1.TaskType`` enum name of a task type (``chat`` → ``TASK_TYPE_CHAT``), as manifests store it."""
    return _ENUM_PREFIX + task_type_name(value).upper().replace("-", "_")


T = TypeVar("T")


class TaskRegistry(Generic[T]):
    """One service's implementations of its task Protocol ``T``, keyed by task type name.

    ``service`` names the owner in messages ("task type 'chat' is not supported by training yet; ...").
    Registration happens at import time of the service's ``tasks`` package; lookups are read-only, so the
    registry needs no lock.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self._entries: dict[str, T] = {}

    def register(self, task_type: str, implementation: T) -> T:
        """Add ``implementation`` for ``task_type`` (a known name); returns it. Registering a name twice is a bug."""
        name = task_type_name(task_type)
        if name in self._entries:
            raise ValueError(f"{self.service}: task type {name!r} is registered twice")
        self._entries[name] = implementation
        return implementation

    def get(self, task_type: str, *, error: type[GristmillError] = InvalidArgumentError, what: str = "task type") -> T:
        """The implementation for ``task_type`` (a name or an enum name; unset means the default).

        An unknown name is an ``InvalidArgumentError`` listing the known task types; a known one this
        service does not implement raises ``error`` (INVALID_ARGUMENT by default: a request named it;
        pass ``FailedPreconditionError`` where the task type comes from stored data) naming the supported ones.
        """
        name = task_type_name(task_type, what=what)
        try:
            return self._entries[name]
        except KeyError:
            raise error(
                f"{what} {name!r} is not supported by {self.service} yet; supported: {', '.join(self.names())}",
                details={"task-type": name},
            ) from None

    def names(self) -> tuple[str, ...]:
        """The task types this service implements, in registration order."""
        return tuple(self._entries)

    def __contains__(self, task_type: object) -> bool:
        if not isinstance(task_type, str):
            return False
        try:
            return task_type_name(task_type) in self._entries
        except InvalidArgumentError:
            return False
