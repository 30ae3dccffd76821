"""From probabilities to predictions, and which predictions are logged for labeling."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gristmill.serving.domain.explanations import Explanation
from gristmill.serving.domain.model import PredictionLoggingConfig

MULTI_LABEL_THRESHOLD = 0.5


@dataclass(frozen=True)
class TextPrediction:
    label: str
    label_index: int
    # Multi-label: every label with probability >= 0.5. Single-label: [label].
    labels: tuple[str, ...]
    probabilities: Sequence[float]
    top_probability: float
    uncertain: bool


@dataclass(frozen=True)
class PredictionResult:
    """One request's answer: which version answered and one prediction per text, in order."""

    deployment: str
    registered_model_name: str
    version: int
    request_id: str
    label_names: tuple[str, ...]
    predictions: tuple[TextPrediction, ...]
    # Tokens the model read (after truncation): metered as input tokens.
    input_tokens: int = 0
    # The same per text, in order (drift monitoring bins them); empty when not known.
    input_lengths: tuple[int, ...] = ()
    # One per text when the request asked for explanations; else empty.
    explanations: tuple[Explanation, ...] = ()


def average_probabilities(models: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """An ensemble's answer: for each text, each label's probability averaged over the models' rows."""
    return [
        [sum(values) / len(values) for values in zip(*per_text, strict=True)] for per_text in zip(*models, strict=True)
    ]


def to_prediction(
    probabilities: Sequence[float], labels: Sequence[str], *, multi_label: bool, uncertainty_threshold: float
) -> TextPrediction:
    """Label, label set and uncertainty for one text's probabilities."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    top = float(probabilities[best])
    if multi_label:
        chosen = tuple(labels[i] for i, p in enumerate(probabilities) if p >= MULTI_LABEL_THRESHOLD)
        label = chosen[0] if chosen else ""
        index = labels.index(label) if chosen else -1
    else:
        chosen = (labels[best],)
        label, index = labels[best], best
    return TextPrediction(
        label=label,
        label_index=index,
        labels=chosen,
        probabilities=probabilities,
        top_probability=top,
        uncertain=uncertainty_threshold > 0 and top < uncertainty_threshold,
    )


@dataclass(frozen=True)
class PredictionRecord:
    """A prediction to publish as ``prediction logged``. ``text`` is raw here; the sink masks it."""

    organization_id: str
    deployment: str
    registered_model_name: str
    version: int
    request_id: str
    index_in_request: int
    text: str
    prediction: TextPrediction
    label_names: tuple[str, ...]
    sampled: bool
    labeling_project_id: str


class PredictionSink(Protocol):
    """Publishes prediction records. Called on the event loop in the request's context: must not block."""

    def log(self, records: Sequence[PredictionRecord]) -> None: ...


def records_to_log(
    result: PredictionResult,
    texts: Sequence[str],
    config: PredictionLoggingConfig,
    *,
    organization_id: str,
    labeling_project_id: str,
    rng: random.Random,
) -> list[PredictionRecord]:
    """The random sample (``sample_rate``) plus every uncertain prediction of ``result``."""
    records = []
    for index, (text, prediction) in enumerate(zip(texts, result.predictions, strict=True)):
        sampled = config.sample_rate > 0 and rng.random() < config.sample_rate
        if not (sampled or prediction.uncertain):
            continue
        records.append(
            PredictionRecord(
                organization_id=organization_id,
                deployment=result.deployment,
                registered_model_name=result.registered_model_name,
                version=result.version,
                request_id=result.request_id,
                index_in_request=index,
                text=text,
                prediction=prediction,
                label_names=result.label_names,
                sampled=sampled,
                labeling_project_id=labeling_project_id,
            )
        )
    return records
