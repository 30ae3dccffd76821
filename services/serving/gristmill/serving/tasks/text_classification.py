"""Text classification (single- and multi-label): the transformers sequence classifier behind the dynamic
batcher, served with OIP ``ModelInfer`` and the typed ``Predict`` (``runtime/classifier.py``)."""

from __future__ import annotations

from pathlib import Path

from gristmill.serving.domain.generation import EngineLimits
from gristmill.serving.domain.sources import Classifier, LoadOptions, ResolvedVersion


class TextClassification:
    """``ServingTask`` for ``text-classification`` and ``text-multi-label-classification``."""

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def prepare(self) -> None:
        import gristmill.serving.runtime.classifier  # noqa: F401

    def load(
        self, directory: Path, resolved: ResolvedVersion, options: LoadOptions, *, trace: bool, limits: EngineLimits
    ) -> Classifier:
        # Imported here: torch and transformers take seconds and hundreds of MB to import.
        from gristmill.serving.runtime.classifier import load_transformers_classifier

        return load_transformers_classifier(directory, resolved, options, trace=trace)
