"""Explanations of a classifier's predictions: which tokens moved the probability of its answer, and by how much.

The runtime computes them (integrated gradients over the input embeddings, ``runtime.classifier``); this module
holds what an explanation is and the limits of a request for one. Explaining a text costs about ``steps`` forward
and backward passes, so a request may explain only a few texts, and explanations run outside the dynamic batcher
(they must not hold up the predictions batched beside them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gristmill.core.errors import InvalidArgumentError

DEFAULT_STEPS = 32
MAX_STEPS = 256
MAX_TEXTS = 16


@dataclass(frozen=True)
class TokenAttribution:
    """One token of the text: where it is (characters ``[start, end)``) and its share of the probability."""

    token: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Explanation:
    """Attributions of one text to one label, in token order (special tokens left out).

    Integrated gradients are complete: the scores sum to ``probability - baseline_probability`` up to ``delta``,
    the integration's error (it shrinks as the steps grow).
    """

    label_index: int
    tokens: tuple[TokenAttribution, ...]
    probability: float
    baseline_probability: float
    delta: float


def validate_explain(texts: Sequence[str], *, explain: bool, steps: int) -> int:
    """The integration steps for a request (0 when it asks for no explanation), or ``InvalidArgumentError``."""
    if not explain:
        if steps:
            raise InvalidArgumentError(f"explain_steps ({steps}) is set but explain is not; set explain to true")
        return 0
    if len(texts) > MAX_TEXTS:
        raise InvalidArgumentError(
            f"explain is for at most {MAX_TEXTS} texts per call (each costs about explain_steps forward and backward "
            f"passes), got {len(texts)}: split the request, or send the rest without explain"
        )
    if not 0 <= steps <= MAX_STEPS:
        raise InvalidArgumentError(
            f"explain_steps must be between 0 and {MAX_STEPS} (0 means {DEFAULT_STEPS}), got {steps}"
        )
    return steps or DEFAULT_STEPS
