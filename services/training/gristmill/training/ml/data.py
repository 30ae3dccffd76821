"""Batches and metrics for the training loop: plain torch, no Ray, so they are tested on their own.

Texts are tokenised once, up front; a batch is padded to its own longest sequence (not to the maximum
length), which is where most of the compute on short texts is saved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids per example (unpadded) and class indexes."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    # The examples' tokens, padding left out (``TrainingBatch.tokens``).
    tokens: int

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.tokens,
        )


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int) -> Batch:
    """One batch padded to its longest example."""
    rows = [split.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = 1
    labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
    return Batch(ids, mask, labels, sum(len(row) for row in rows))


def epoch_shard(size: int, *, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's example order for ``epoch``: one shuffle shared by all ranks (seeded by seed and epoch),
    cut into equal strided shards. Up to ``world_size - 1`` examples are left out so every rank runs the
    same number of batches (DDP needs that)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    usable = (size // world_size) * world_size
    return order[:usable][rank::world_size]


def eval_shard(size: int, *, rank: int, world_size: int) -> list[int]:
    """Every example exactly once over all ranks (evaluation needs no equal shards)."""
    return list(range(rank, size, world_size))


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


def steps_per_epoch(size: int, *, batch_size: int, world_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (the last step of an epoch may accumulate fewer micro-batches)."""
    per_rank = size // world_size
    micro = math.ceil(per_rank / batch_size)
    return max(1, math.ceil(micro / accumulation))


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float
    f1: float
    count: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "f1": self.f1}


def confusion_update(confusion: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor) -> None:
    """Add a batch to a (true, predicted) confusion matrix in place."""
    classes = confusion.shape[0]
    confusion += torch.bincount(labels * classes + predictions, minlength=classes * classes).view(classes, classes)


def scores(confusion: torch.Tensor, loss_sum: float) -> Scores:
    """Accuracy and macro F1 (the mean over classes that appear in labels or predictions) from a confusion
    matrix; ``loss_sum`` is the summed per-example loss."""
    confusion = confusion.to(torch.float64)
    total = float(confusion.sum())
    if total == 0:
        return Scores(loss=0.0, accuracy=0.0, f1=0.0, count=0)
    true_positive = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    present = (predicted + actual) > 0
    denominator = predicted + actual
    f1_per_class = torch.where(
        denominator > 0, 2 * true_positive / denominator.clamp(min=1), torch.zeros_like(denominator)
    )
    f1 = float(f1_per_class[present].mean()) if bool(present.any()) else 0.0
    return Scores(loss=loss_sum / total, accuracy=float(true_positive.sum()) / total, f1=f1, count=int(total))


def improved(value: float, best: float | None, *, maximize: bool, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if maximize else value < best - min_delta


def learning_rate_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps: linear warmup, then linear
    decay to 0, cosine decay to 0, or constant."""
    if warmup and step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    remaining = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)
