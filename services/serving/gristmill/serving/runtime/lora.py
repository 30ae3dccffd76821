"""Batched LoRA: every row of a forward pass uses its own adapter, with two matmuls per layer however many adapters.

PEFT's mixed-batch path (``adapter_names``) registers a hook on every LoRA layer for each forward pass, and in each
layer rebuilds Python lists of the rows of each adapter, then runs that adapter's two matmuls on those rows and
scatters the result back. On SmolLM2 with adapters on q/k/v/o (120 LoRA layers) at 32 sequences, two adapters in
the batch cost 10-20% of the decoding throughput against one (``benchmarks/lora_step_benchmark.py``).

Here each LoRA layer keeps the adapters of its model side by side: ``A`` of every adapter stacked into one
``[adapters * rank, in]`` matrix and ``B`` (scaled) into one ``[out, adapters * rank]`` matrix, each adapter in a
slot of the largest rank (smaller ranks and layers an adapter does not target padded with zeros). A forward pass
computes ``x @ A.T`` for all slots at once, zeroes the slots that are not the row's own adapter (a mask built once
per step, not per layer), and multiplies by ``B.T``: two matmuls whose inner size is ``adapters * rank`` (16 for
two rank-8 adapters, against 576 and more for the base layer), no gathers, no Python per row. A batch whose rows
all use one adapter uses that adapter's slot alone. The products are the same as PEFT's; only the order of the
floating-point sums inside a matmul may differ (the tests compare within 1e-5).

Plain LoRA linear layers only: a model with another kind of LoRA layer (DoRA and the other variants, LoRA on
embeddings, ``lora_bias``) or with ``modules_to_save`` keeps PEFT's path (``install`` returns False).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# PEFT's name for "no adapter" in a mixed batch.
BASE_ADAPTER = "__base__"


@dataclass
class _Step:
    """The rows of the forward pass being run: each row's slot mask, or the one slot every row uses."""

    names: Sequence[str]
    mask: torch.Tensor | None  # [rows, 1, slots * rank]; None when every row has the same adapter (or none)
    uniform: int | None  # that adapter's slot; -1: every row is the bare base


@dataclass
class _Stack:
    a: torch.Tensor  # [slots * rank, in]
    b: torch.Tensor  # [out, slots * rank], scaled
    a_slots: list[torch.Tensor]  # each [rank, in], a view of ``a``
    b_slots: list[torch.Tensor]  # each [out, rank], contiguous


class BatchedLora:
    """Installed on a PEFT model; the batcher names each row's adapter with ``select`` before a forward pass."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._rank = 0
        self._dtype = torch.float32
        self._layers: list[Any] = []
        self._step: _Step | None = None

    def install(self, model: Any) -> bool:
        """Take over the forward pass of every LoRA layer of ``model`` (again after adapters were added or
        removed). False when the model has a LoRA layer this cannot compute: then nothing is taken over."""
        from peft.tuners.lora.layer import Linear, LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        modules = list(model.modules())
        layers: list[Any] = [m for m in modules if isinstance(m, LoraLayer)]
        # modules_to_save and trainable tokens choose per row too, in PEFT's path only.
        wrapped = any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)
        if wrapped or any(type(m) is not Linear or m.lora_variant or _has_bias(m) for m in layers):
            self.uninstall()
            return False
        for layer in layers:
            if "forward" not in vars(layer):
                layer.forward = functools.partial(self.forward, layer)
        self._layers = layers
        self._order = sorted({name for layer in layers for name in layer.lora_A})
        self._rank = max((layer.r[name] for layer in layers for name in layer.lora_A), default=0)
        weights = [layer.lora_A[name].weight for layer in layers for name in layer.lora_A]
        self._dtype = weights[0].dtype if weights else torch.float32
        # Built here, under the caller's model lock, not in the first forward pass after an adapter change.
        for layer in layers:
            layer._gristmill_stack = self._stack(layer)
        return True

    def uninstall(self) -> None:
        for layer in self._layers:
            vars(layer).pop("forward", None)
            vars(layer).pop("_gristmill_stack", None)
        self._layers = []

    def select(self, names: Sequence[str]) -> None:
        """Each row's adapter (``BASE_ADAPTER``: none) for the next forward pass, until ``clear``."""
        slots = [-1 if name == BASE_ADAPTER else self._order.index(name) for name in names]
        if len(set(slots)) == 1:
            self._step = _Step(names, None, slots[0])
            return
        mask = torch.zeros((len(slots), 1, len(self._order) * self._rank), dtype=self._dtype)
        for row, slot in enumerate(slots):
            if slot >= 0:
                mask[row, 0, slot * self._rank : (slot + 1) * self._rank] = 1
        self._step = _Step(names, mask, None)

    def clear(self) -> None:
        self._step = None

    def forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        step = self._step
        if step is None or "adapter_names" in kwargs or x.dim() != 3 or x.shape[0] != len(step.names):
            # Not run by the batcher (or a shape this does not handle): PEFT's own forward, with the rows' adapters.
            if step is not None:
                kwargs.setdefault("adapter_names", list(step.names))
            peft_result: torch.Tensor = type(layer).forward(layer, x, *args, **kwargs)
            return peft_result
        result: torch.Tensor = layer.base_layer(x, *args, **kwargs)
        if step.uniform == -1:
            return result
        stack: _Stack = layer._gristmill_stack
        lora_x = x.to(stack.a.dtype)
        if step.uniform is not None:
            delta = F.linear(F.linear(lora_x, stack.a_slots[step.uniform]), stack.b_slots[step.uniform])
        else:
            assert step.mask is not None
            delta = F.linear(F.linear(lora_x, stack.a).mul_(step.mask), stack.b)
        # In place: the base layer's output is this call's own tensor (no autograd at inference).
        return result.add_(delta.to(result.dtype))

    def _stack(self, layer: Any) -> _Stack:
        """``layer``'s adapters side by side, in ``_order``'s slots of ``_rank``."""
        rank, slots = self._rank, len(self._order)
        base = layer.get_base_layer()
        a = torch.zeros((slots * rank, base.in_features), dtype=self._dtype)
        b = torch.zeros((base.out_features, slots * rank), dtype=self._dtype)
        with torch.no_grad():
            for slot, name in enumerate(self._order):
                if name not in layer.lora_A:
                    continue  # an adapter that does not target this layer: its slot stays zero
                r = layer.r[name]
                a[slot * rank : slot * rank + r] = layer.lora_A[name].weight
                b[:, slot * rank : slot * rank + r] = layer.lora_B[name].weight * layer.scaling[name]
        return _Stack(
            a,
            b,
            [a[s * rank : (s + 1) * rank] for s in range(slots)],
            [b[:, s * rank : (s + 1) * rank].contiguous() for s in range(slots)],
        )


def _has_bias(layer: Any) -> bool:
    return any(getattr(module, "bias", None) is not None for module in layer.lora_B.values())
