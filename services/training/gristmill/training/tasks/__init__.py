"""Training's task types: the objective a job trains with, chosen by the dataset version's task type.

A task type is one module here implementing ``TrainingTask``, registered below. It decides what the loop
is fed (examples from dataset rows), which model is built from the base (head, LoRA task), how a batch is
collated and what its loss is, what evaluation measures, and the signature the published model declares.
The Ray runner, the loop's schedule, checkpoints, early stopping and publishing stay generic.

The service imports this package at start, so implementations import torch, transformers and peft only
inside the methods the training loop calls (in Ray workers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gristmill.core.errors import GristmillError, InvalidArgumentError
from gristmill.core.manifests import DatasetRow
from gristmill.core.tasks import TEXT_CLASSIFICATION, TaskRegistry
from gristmill.core.values import Signature
from gristmill.training.domain.lora import LoraSettings

if TYPE_CHECKING:
    import torch


class TrainingBatch(Protocol):
    """What the loop needs from a collated batch; its tensors are the task's business."""

    @property
    def size(self) -> int: ...

    def to(self, device: torch.device) -> Any: ...


class Evaluation(Protocol):
    """Accumulates one split's evaluation on one rank; the totals are summed over ranks, then scored."""

    def add(self, model: torch.nn.Module, batch: Any) -> None: ...

    def totals(self) -> torch.Tensor:
        """Everything ``scores`` needs as one flat float64 tensor (the loop all-reduces it)."""
        ...

    def scores(self, totals: torch.Tensor) -> dict[str, float]:
        """The metrics (``loss`` and the task's, e.g. ``accuracy``, ``f1``) from the summed totals."""
        ...


class TrainingTask(Protocol):
    """What training needs from a task type."""

    @property
    def name(self) -> str: ...

    # -- in the service: datasets and the published model ---------------------------------------------

    def check_label_map(self, label_map: Sequence[str], where: str) -> None:
        """``FailedPreconditionError`` when a dataset version's label map cannot be trained on."""
        ...

    def examples(self, rows: Sequence[DatasetRow], label_map: Sequence[str], where: str) -> tuple[list[str], list[int]]:
        """One split's rows as the loop's inputs (texts and targets); ``FailedPreconditionError`` on a bad row."""
        ...

    def signature(self, label_map: Sequence[str]) -> Signature:
        """The Open Inference Protocol signature of a model trained for this task."""
        ...

    # -- in the training loop (torch) ---------------------------------------------------------------------

    def build_model(self, model_dir: Path, label_map: Sequence[str], lora: LoraSettings | None) -> torch.nn.Module:
        """The trainable model from the base in ``model_dir`` (LoRA-wrapped when ``lora`` is given)."""
        ...

    def encode(self, tokenizer: Any, texts: list[str], targets: list[int], max_length: int) -> Any:
        """One split, tokenised once (what ``collate`` takes)."""
        ...

    def collate(self, split: Any, indices: Sequence[int], pad_id: int) -> TrainingBatch:
        """One batch of ``split`` (the examples at ``indices``)."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The mean training loss of ``batch`` (before gradient accumulation scaling)."""
        ...

    def evaluation(
        self, label_map: Sequence[str], device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]
    ) -> Evaluation:
        """A fresh evaluation accumulator; forward passes run under ``autocast()``."""
        ...


TRAINING_TASKS: TaskRegistry[TrainingTask] = TaskRegistry("training")


def training_task(task_type: str, *, error: type[GristmillError] = InvalidArgumentError) -> TrainingTask:
    """The objective for a task type (a name or an enum name; unset means text classification)."""
    return TRAINING_TASKS.get(task_type, error=error)


def _register() -> None:
    from gristmill.training.tasks.text_classification import TextClassification

    TRAINING_TASKS.register(TEXT_CLASSIFICATION, TextClassification())


_register()
