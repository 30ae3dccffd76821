"""LoRA settings of a job: what both the job spec and the task modules that build adapters read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    # Empty: the architecture's attention projections (decided when the model is inspected).
    target_modules: tuple[str, ...] = ()
    # QLoRA (method qlora): the frozen base is loaded in 4-bit NF4 (bitsandbytes, CUDA only) under the adapters.
    quantize_base: bool = False
