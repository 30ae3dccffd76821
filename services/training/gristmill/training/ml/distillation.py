"""Knowledge distillation for classifiers (Hinton et al. 2015): the model learns the teacher's softened class
probabilities as well as the labels.

The teacher runs once, before training, over the train split as the job trains on it (augmented copies
included), with its own tokenizer: its logits are kept (examples x classes, a few KB) and each batch looks its
rows up by example index. So the teacher costs one forward pass per example per job, not one per step, and a
resumed run computes the same logits again (eval mode, no dropout).

With a hidden weight, the teacher's last-layer representation of each example's first token (what a
classification head reads; examples x hidden, 9 MB for 6,000 MiniLM examples) is kept too, and the model's is
pulled towards it: the mean squared difference over the teacher's variance (a scale-free term), as TinyBERT and
MiniLM distil hidden states, here of the one token the head uses (so it is cached, not recomputed every step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gristmill.training.ml.data import Batch
from gristmill.training.ml.ranks import each_chunk_once
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
    """The teacher's outputs for the train split, and the loss that uses them."""

    def __init__(
        self,
        outputs: TeacherOutputs,
        *,
        temperature: float,
        weight: float,
        hidden_weight: float = 0.0,
    ) -> None:
        self.logits = outputs.logits
        self.hidden = outputs.hidden
        self.temperature = temperature
        self.weight = weight
        self.hidden_weight = hidden_weight
        # The teacher's per-dimension variance, averaged: the scale the hidden term is measured in.
        self.hidden_scale = float(outputs.hidden.var(dim=0).mean().clamp_min(1e-8)) if len(outputs.hidden) > 1 else 1.0

    def loss(self, model: torch.nn.Module, batch: Batch, indices: Sequence[int]) -> torch.Tensor:
        matching = self.hidden_weight > 0
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=matching)
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.logits.device)
        loss = distillation_loss(
            output.logits,
            self.logits.index_select(0, index),
            batch.labels,
            temperature=self.temperature,
            weight=self.weight,
        )
        if matching:
            first = output.hidden_states[-1][:, 0].float()
            loss = loss + self.hidden_weight * F.mse_loss(first, self.hidden.index_select(0, index)) / self.hidden_scale
        return loss


@dataclass(frozen=True)
class TeacherOutputs:
    """Per train example: the teacher's logits, and its last layer's first-token representation."""

    logits: torch.Tensor
    hidden: torch.Tensor


def teacher_outputs(
    teacher_dir: Path,
    task: TrainingTask,
    examples: Sequence[Any],
    label_map: Sequence[str],
    *,
    max_length: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> TeacherOutputs:
    """The teacher's outputs (float32, on ``device``) for ``examples``, in their order; the teacher is freed
    afterwards. With several workers each runs the teacher over a share of the batches and they exchange the
    outputs (``ranks.each_chunk_once``)."""
    from gristmill.training.ml import modeling

    tokenizer = modeling.load_tokenizer(teacher_dir)
    model: Any = modeling.load_classifier(teacher_dir, label_map).to(device).eval()
    split = task.encode(tokenizer, examples, max_length)
    pad_id = int(tokenizer.pad_token_id or 0)
    starts = range(0, len(examples), TEACHER_BATCH)

    def run(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = range(starts[chunk], min(starts[chunk] + TEACHER_BATCH, len(examples)))
        batch = task.collate(split, indices, pad_id).to(device)
        with torch.inference_mode():
            output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        # On the CPU: the results travel between ranks pickled.
        return output.logits.float().cpu(), output.hidden_states[-1][:, 0].float().cpu()

    parts = each_chunk_once(len(starts), run, rank=rank, world_size=world_size)
    size = int(model.config.hidden_size)
    if not parts:
        return TeacherOutputs(torch.zeros((0, len(label_map)), device=device), torch.zeros((0, size), device=device))
    # Out of inference mode (a new tensor): the loss indexes these under autograd.
    logits = torch.cat([p[0] for p in parts]).to(device)
    hidden = torch.cat([p[1] for p in parts]).to(device)
    return TeacherOutputs(logits, hidden)
