"""Adversarial training on the input embeddings (FGM, Miyato et al. 2017), a regulariser for few labels.

After the clean backward pass, each sequence's word embeddings are pushed by ``epsilon`` along the direction that
raises its loss most (the gradient, L2-normalised over the sequence), and the loss of that perturbed batch is
added to the gradients. The perturbation is on the embedding layer's output, not its weights, so it works the
same when the embeddings are frozen (LoRA): a frozen output is made a leaf that records its gradient.
"""

from __future__ import annotations

from typing import Any

import torch


class EmbeddingAdversary:
    """A forward hook on the embedding layer: records its output's gradient, then adds the perturbation."""

    def __init__(self, embeddings: torch.nn.Module, epsilon: float) -> None:
        self.epsilon = epsilon
        self._output: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None
        self._handle = embeddings.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._delta is not None:
            return output + self._delta
        if not torch.is_grad_enabled():  # evaluation
            return None
        if output.requires_grad:
            output.retain_grad()
        else:
            output = output.detach().requires_grad_()
        self._output = output
        return output

    def perturb(self) -> bool:
        """After the clean backward pass: set the perturbation for the next forward (False: no gradient came)."""
        output, self._output = self._output, None
        if output is None or output.grad is None:
            return False
        grad = output.grad.detach().float()
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        self._delta = (self.epsilon * grad / norm).to(output.dtype)
        return True

    def clear(self) -> None:
        self._delta = None

    def remove(self) -> None:
        self._handle.remove()
