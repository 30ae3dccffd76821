"""Single-label text classification (objective ``classify``): a sequence-classification head over the base,
cross-entropy over the label map's class indexes, accuracy and macro F1 from a confusion matrix, the
classifier's OIP signature (``text`` in; ``probabilities``, ``label``, ``label_index`` out), and LoRA merged
into the published weights.

The tensor helpers (padding collation, confusion matrix, scores) are in ``gristmill.training.ml.data`` and
the Hugging Face loading in ``gristmill.training.ml.modeling``; both import torch, so they are imported
inside the methods the loop calls, never when the service imports this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gristmill.core import drift
from gristmill.core.chat import ROW_FORMAT_CLASSIFICATION
from gristmill.core.errors import FailedPreconditionError
from gristmill.core.manifests import DatasetRecord, DatasetRow
from gristmill.core.tasks import TEXT_CLASSIFICATION
from gristmill.core.values import Signature, TensorSpec
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.objectives import Objective
from gristmill.training.tasks.base import ModelCardText

if TYPE_CHECKING:
    import torch

    from gristmill.training.ml.data import Batch, EncodedSplit


@dataclass(frozen=True)
class LabelledText:
    """One classification example: a text and its class index in the label map."""

    text: str
    label: int


def classification_signature(num_labels: int) -> Signature:
    """The Open Inference Protocol signature of a text classifier, as the inference proto recommends."""
    return Signature(
        inputs=(TensorSpec("text", "BYTES", (-1,)),),
        outputs=(
            TensorSpec("probabilities", "FP32", (-1, num_labels)),
            TensorSpec("label", "BYTES", (-1,)),
            TensorSpec("label_index", "INT64", (-1,)),
        ),
    )


class TextClassification:
    """``TrainingTask`` for ``text-classification``."""

    @property
    def name(self) -> str:
        return TEXT_CLASSIFICATION

    @property
    def objective(self) -> Objective:
        return Objective.CLASSIFY

    @property
    def row_format(self) -> str:
        return ROW_FORMAT_CLASSIFICATION

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("f1", "accuracy", "loss")

    @property
    def uses_chat_template(self) -> bool:
        return False

    def check_label_map(self, label_map: Sequence[str], where: str) -> None:
        if len(label_map) < 2 or len(set(label_map)) != len(label_map):
            raise FailedPreconditionError(
                f"{where} needs at least two distinct labels to train a classifier (label map: {list(label_map)[:10]})"
            )

    def examples(self, records: Sequence[DatasetRecord], label_map: Sequence[str], where: str) -> list[LabelledText]:
        index = {label: i for i, label in enumerate(label_map)}
        examples: list[LabelledText] = []
        for record in records:
            row = DatasetRow.from_object(record.data, where=record.where)
            if row.label is None:
                raise FailedPreconditionError(
                    f"{where} row {row.id!r} has no single label; multi-label training is not supported yet"
                )
            if row.label not in index:
                raise FailedPreconditionError(
                    f"{where} row {row.id!r} has label {row.label!r}, which is not in the version's label map"
                )
            examples.append(LabelledText(row.text, index[row.label]))
        return examples

    def output_labels(self, label_map: Sequence[str]) -> tuple[str, ...]:
        return tuple(label_map)

    def label_counts(self, examples: Sequence[LabelledText], label_map: Sequence[str]) -> dict[str, int]:
        return dict(Counter(label_map[e.label] for e in examples))

    def default_lora_targets(self, model_type: str, adaptable: frozenset[str]) -> tuple[str, ...]:
        from gristmill.training.ml import modeling

        return modeling.default_lora_targets(model_type)

    def signature(self, label_map: Sequence[str]) -> Signature:
        return classification_signature(len(label_map))

    def card(self, label_map: Sequence[str]) -> ModelCardText:
        return ModelCardText(
            summary="Text classifier",
            data=(f"- Labels (class index order): {', '.join(f'`{label}`' for label in label_map)}",),
            lora_weights="merged into the weights",
            use="Input: a batch of texts (`text`, BYTES). Output: class probabilities (`probabilities`, FP32), the "
            "predicted label (`label`, BYTES) and its index (`label_index`, INT64). Loads with "
            "`AutoModelForSequenceClassification.from_pretrained`.",
        )

    def skeleton(self, model_dir: Path, label_map: Sequence[str]) -> torch.nn.Module:
        from gristmill.training.ml import modeling

        return modeling.classifier_skeleton(model_dir, num_labels=max(2, len(label_map)))

    def build_model(self, model_dir: Path, label_map: Sequence[str], lora: LoraSettings | None) -> torch.nn.Module:
        from gristmill.training.ml import modeling

        model = modeling.load_classifier(model_dir, label_map)
        if lora is not None:
            model = modeling.apply_lora(
                model, modeling.LoraOptions(lora.rank, lora.alpha, lora.dropout, lora.target_modules)
            )
        return model

    def encode(self, tokenizer: Any, examples: Sequence[LabelledText], max_length: int) -> EncodedSplit:
        from gristmill.training.ml import data

        texts = [e.text for e in examples]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
        return data.EncodedSplit(ids, [e.label for e in examples])

    def collate(self, split: EncodedSplit, indices: Sequence[int], pad_id: int) -> Batch:
        from gristmill.training.ml import data

        return data.collate(split, indices, pad_id)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        loss: torch.Tensor = output.loss
        return loss

    def evaluation(
        self, label_map: Sequence[str], device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]
    ) -> ClassificationEvaluation:
        return ClassificationEvaluation(len(label_map), device, autocast)

    def save(self, model: torch.nn.Module, tokenizer: Any, dest: Path) -> None:
        from gristmill.training.ml import modeling

        # Serving loads a plain Transformers classifier: LoRA is folded into the weights.
        merged = modeling.merge_lora(model)
        merged.save_pretrained(dest, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(dest)


class ClassificationEvaluation:
    """Summed cross-entropy and a (true, predicted) confusion matrix; scored as loss, accuracy, macro F1. Also
    counts the top probabilities per bin: with the confusion matrix's predicted-label counts, the split's
    prediction profile (``profile``)."""

    def __init__(self, classes: int, device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        import torch

        self.classes = classes
        self.autocast = autocast
        self.confusion = torch.zeros((classes, classes), dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top_bins = torch.zeros(drift.BINS, dtype=torch.float64, device=device)
        self.length_bins = torch.zeros(drift.BINS, dtype=torch.float64, device=device)

    def add(self, model: torch.nn.Module, batch: Batch) -> None:
        import torch

        from gristmill.training.ml import data

        with self.autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        self.loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum").double()
        data.confusion_update(self.confusion, batch.labels, logits.argmax(dim=-1))
        top = torch.softmax(logits.float(), dim=-1).max(dim=-1).values
        # Serving bins with gristmill.core.drift.top_probability_bin: the same equal bins of [0, 1].
        bins = (top * drift.BINS).long().clamp(0, drift.BINS - 1)
        self.top_bins += torch.bincount(bins, minlength=drift.BINS).double()
        # Tokens read per input (after truncation), binned as gristmill.core.drift.input_length_bin does.
        tokens = batch.attention_mask.sum(dim=-1).clamp(min=1).double()
        lengths = (torch.log2(tokens) * drift.BINS / drift.LOG2_MAX_TOKENS).long().clamp(0, drift.BINS - 1)
        self.length_bins += torch.bincount(lengths, minlength=drift.BINS).double()

    def totals(self) -> torch.Tensor:
        import torch

        return torch.cat([self.confusion.flatten().double(), self.loss_sum.view(1), self.top_bins, self.length_bins])

    def scores(self, totals: torch.Tensor) -> dict[str, float]:
        from gristmill.training.ml import data

        classes = self.classes
        cells = classes * classes
        return data.scores(totals[:cells].view(classes, classes).long(), float(totals[cells])).as_dict()

    def profile(self, totals: torch.Tensor, label_map: Sequence[str]) -> drift.PredictionProfile:
        classes = self.classes
        cells = classes * classes
        predicted = totals[:cells].view(classes, classes).sum(dim=0)  # columns: predicted labels
        return drift.PredictionProfile(
            top_probability_counts=tuple(int(c) for c in totals[cells + 1 : cells + 1 + drift.BINS].tolist()),
            label_counts={label: int(predicted[i]) for i, label in enumerate(label_map)},
            input_length_counts=tuple(int(c) for c in totals[cells + 1 + drift.BINS :].tolist()),
        )
