"""DPO settings of a job: what both the job spec and the preference task, which computes the loss, read."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# The DPO paper's and TRL's default.
DEFAULT_BETA = 0.1


class DpoLoss(StrEnum):
    """The preference loss, as TRL's ``DPOTrainer`` names (and computes) it; the margin is (chosen - rejected) of
    the policy's log-probability ratios to the reference."""

    # -log sigmoid(beta * margin) (Rafailov et al. 2023).
    SIGMOID = "sigmoid"
    # (margin per completion token - 1 / (2 beta))^2 (Azar et al. 2023, with TRL's length normalisation).
    IPO = "ipo"
    # max(0, 1 - beta * margin) (SLiC, Zhao et al. 2023).
    HINGE = "hinge"


@dataclass(frozen=True)
class DpoSettings:
    # The loss's temperature (IPO's regulariser tau): how far the policy may move from the reference model.
    beta: float = DEFAULT_BETA
    loss: DpoLoss = DpoLoss.SIGMOID
