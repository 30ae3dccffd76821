"""What training needs from a task type (``TrainingTask``) and the values a task hands the generic code: the
protocols the task modules implement, below the domain and above nothing but it (``domain.lora``,
``domain.objectives``), so the task modules, the loop and the inspection import them without a cycle."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gristmill.core.drift import PredictionProfile
from gristmill.core.manifests import DatasetRecord
from gristmill.core.values import Signature
from gristmill.training.domain.lora import LoraSettings

if TYPE_CHECKING:
    import torch

    from gristmill.training.domain.objectives import Objective


class TrainingBatch(Protocol):
    """What the loop needs from a collated batch; its tensors are the task's business."""

    @property
    def size(self) -> int:
        """Examples in the batch (throughput counts these)."""
        ...

    @property
    def tokens(self) -> int:
        """Input tokens the batch trains on, padding left out (token throughput counts these). Counted on the host
        when the batch is collated, so that reading it costs no device sync."""
        ...

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


@runtime_checkable
class ProfilesPredictions(Protocol):
    """An ``Evaluation`` that also profiles its predictions (a classifier's): the reference serving measures drift
    against (``gristmill.core.drift``)."""

    def profile(self, totals: torch.Tensor, label_map: Sequence[str]) -> PredictionProfile: ...


@dataclass(frozen=True)
class SampleGeneration:
    """One test example's prompt, reference reply and the model's (greedy) reply, as the model card shows it."""

    # The conversation up to the reply (OpenAI-shaped message dicts).
    prompt: list[dict[str, Any]]
    reference: str
    generation: str


class GenerationEvaluation(Protocol):
    """Accumulates generation metrics on one rank (the loop sums the totals over ranks, then scores them)."""

    def add(self, model: torch.nn.Module, examples: Sequence[Any]) -> None:
        """Generate for ``examples`` (the task's raw examples) and score the replies."""
        ...

    def totals(self) -> torch.Tensor:
        """Everything ``scores`` needs as one flat float64 tensor (the loop all-reduces it)."""
        ...

    def scores(self, totals: torch.Tensor) -> dict[str, float]: ...

    def samples(self) -> list[SampleGeneration]:
        """The first examples generated on this rank, for the model card."""
        ...


@runtime_checkable
class GeneratesText(Protocol):
    """A task whose model generates text, evaluated by generation on (a bounded part of) the test split once training
    ended: not a ``TrainingTask`` member, so tasks without generation need nothing."""

    def generation_evaluation(
        self,
        tokenizer: Any,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
        *,
        json_match_keys: Sequence[str] = (),
    ) -> GenerationEvaluation:
        """A fresh generation accumulator; ``json_match_keys``: the job's (``spec.json_match_keys``)."""
        ...


class EncodingError(ValueError):
    """``TrainingTask.encode`` cannot encode a split as the task needs; ``field`` names the spec field that fixes
    it (the service refuses the job naming it when a sample of the train split fails the same way)."""

    field = "spec.base_model"


@dataclass(frozen=True)
class ModelCardText:
    """The task's parts of the published model card."""

    # What the model is, as the card's first sentence names it ("Text classifier").
    summary: str
    # Extra lines of the card's "Data" section (the label map).
    data: tuple[str, ...]
    # How LoRA adapters end up in the artifact ("merged into the weights").
    lora_weights: str
    # The "Use" section: inputs, outputs, how to load it.
    use: str


class TrainingTask(Protocol):
    """What training needs from a task type."""

    @property
    def name(self) -> str: ...

    @property
    def objective(self) -> Objective:
        """The objective this task trains with (``spec.objective``)."""
        ...

    @property
    def row_format(self) -> str:
        """The dataset manifest's ``row_format`` the task reads (``gristmill.core.chat.ROW_FORMAT_*``)."""
        ...

    @property
    def metrics(self) -> tuple[str, ...]:
        """What ``Evaluation.scores`` reports; the first is the validation metric when the spec names none."""
        ...

    @property
    def uses_chat_template(self) -> bool:
        """Whether examples are rendered with a chat template (the base's, or ``spec.chat_template``)."""
        ...

    # -- in the service: datasets, the base model and the published model ------------------------------------

    def check_label_map(self, label_map: Sequence[str], where: str) -> None:
        """``FailedPreconditionError`` when a dataset version's label map cannot be trained on."""
        ...

    def examples(self, records: Sequence[DatasetRecord], label_map: Sequence[str], where: str) -> list[Any]:
        """One split's rows as the loop's examples (plain, picklable values); ``FailedPreconditionError`` (or
        ``InvalidArgumentError`` naming the line) on a bad row."""
        ...

    def output_labels(self, label_map: Sequence[str]) -> tuple[str, ...]:
        """The labels a model trained on a version with ``label_map`` outputs (the published label map): the
        version's own for a classifier, none for a generator."""
        ...

    def label_counts(self, examples: Sequence[Any], label_map: Sequence[str]) -> dict[str, int] | None:
        """Examples per label, to check against the manifest's counts; None where the counts are not labels."""
        ...

    def default_lora_targets(self, model_type: str, adaptable: frozenset[str]) -> tuple[str, ...]:
        """LoRA target modules when the spec names none (``adaptable``: the model's linear layer names)."""
        ...

    def signature(self, label_map: Sequence[str]) -> Signature:
        """The Open Inference Protocol signature of a model trained for this task."""
        ...

    def card(self, label_map: Sequence[str]) -> ModelCardText:
        """The task's parts of the model card."""
        ...

    # -- where torch runs: base-model inspection and the training loop -------------------------------------------

    def skeleton(self, model_dir: Path, label_map: Sequence[str]) -> torch.nn.Module:
        """The model ``build_model`` would build, on the meta device (no weights): inspection lists its layers,
        and an architecture the task cannot build fails here."""
        ...

    def build_model(self, model_dir: Path, label_map: Sequence[str], lora: LoraSettings | None) -> torch.nn.Module:
        """The trainable model from the base in ``model_dir`` (LoRA-wrapped when ``lora`` is given)."""
        ...

    def encode(self, tokenizer: Any, examples: Sequence[Any], max_length: int) -> Sized:
        """One split, tokenised once (what ``collate`` takes; its length is the examples it kept)."""
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

    def save(self, model: torch.nn.Module, tokenizer: Any, dest: Path) -> None:
        """Write the published model files into ``dest`` (weights or adapter, config, tokenizer)."""
        ...
