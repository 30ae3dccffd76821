"""Chat: a causal language model (SFT/DPO versions, merged or full fine-tunes) behind the continuous batcher,
served with the streaming ``Generate`` (``runtime/generation.py``)."""

from __future__ import annotations

from pathlib import Path

from gristmill.serving.domain.generation import EngineLimits, GenerativeModel
from gristmill.serving.domain.sources import LoadOptions, ResolvedVersion


class ChatGeneration:
    """``ServingTask`` for ``chat``."""

    @property
    def name(self) -> str:
        return "chat"

    def prepare(self) -> None:
        import gristmill.serving.runtime.generation  # noqa: F401

    def load(
        self, directory: Path, resolved: ResolvedVersion, options: LoadOptions, *, trace: bool, limits: EngineLimits
    ) -> GenerativeModel:
        # Imported here: torch and transformers take seconds and hundreds of MB to import.
        from gristmill.serving.runtime.generation import load_transformers_generator

        return load_transformers_generator(directory, resolved, options, limits=limits)
