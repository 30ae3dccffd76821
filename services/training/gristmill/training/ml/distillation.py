"""Knowledge distillation for classifiers (Hinton et al. 2015): the model learns the teacher's softened class
probabilities as well as the labels.

The teacher runs once, before training, over the train split as the job trains on it (augmented copies
included), with its own tokenizer: its logits are kept (examples x classes, a few KB) and each batch looks its
rows up by example index. So the teacher costs one forward pass per example per job, not one per step, and a
resumed run computes the same logits again (eval mode, no dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gristmill.training.ml.data import Batch
from gristmill.training.tasks import TrainingTask

TEACHER_BATCH = 64


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, weight: float
) -> torch.Tensor:
    """(1 - weight) x CE(labels) + weight x T^2 x KL(softmax(teacher / T) || softmax(logits / T)); the T^2 keeps
    the soft term's gradients on the hard term's scale whatever the temperature."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0.0:
        return hard
    soft = F.kl_div(
        F.log_softmax(logits.float() / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature * temperature)
    return (1.0 - weight) * hard + weight * soft


class Teacher:
    """The teacher's logits for the train split, and the loss that uses them."""

    def __init__(self, logits: torch.Tensor, *, temperature: float, weight: float) -> None:
        self.logits = logits
        self.temperature = temperature
        self.weight = weight

    def loss(self, model: torch.nn.Module, batch: Batch, indices: Sequence[int]) -> torch.Tensor:
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.logits.device)
        return distillation_loss(
            output.logits,
            self.logits.index_select(0, index),
            batch.labels,
            temperature=self.temperature,
            weight=self.weight,
        )


def teacher_logits(
    teacher_dir: Path,
    task: TrainingTask,
    examples: Sequence[Any],
    label_map: Sequence[str],
    *,
    max_length: int,
    device: torch.device,
) -> torch.Tensor:
    """The teacher's logits (float32, on ``device``) for ``examples``, in their order; the teacher is freed
    afterwards."""
    from gristmill.training.ml import modeling

    tokenizer = modeling.load_tokenizer(teacher_dir)
    model = modeling.load_classifier(teacher_dir, label_map).to(device).eval()
    split = task.encode(tokenizer, examples, max_length)
    pad_id = int(tokenizer.pad_token_id or 0)
    rows: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(examples), TEACHER_BATCH):
            indices = range(start, min(start + TEACHER_BATCH, len(examples)))
            batch = task.collate(split, indices, pad_id).to(device)
            rows.append(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float())
    del model
    if not rows:
        return torch.zeros((0, len(label_map)), device=device)
    # Out of inference mode: the loss indexes these under autograd.
    return torch.cat(rows).clone()
