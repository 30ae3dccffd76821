"""DPO settings of a job: what both the job spec and the preference task, which computes the loss, read."""

from __future__ import annotations

from dataclasses import dataclass

# The DPO paper's and TRL's default.
DEFAULT_BETA = 0.1


@dataclass(frozen=True)
class DpoSettings:
    # Temperature of the sigmoid DPO loss: how far the policy may move from the reference model.
    beta: float = DEFAULT_BETA
