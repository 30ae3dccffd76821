"""Labeling settings, read from GRISTMILL_LABELING_* by ``__main__`` only."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gristmill.core.events.topics import LABELING_ACTIVE_LEARNING, LABELING_FEEDBACK
from gristmill.core.ports import LABELING_PORT, default_address
from gristmill.core.settings import ServiceSettings


class LabelingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_LABELING_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=LABELING_PORT, ge=0, le=65535)
    # Projects whose near-duplicate index stays in memory (least recently used ones are rebuilt on demand).
    index_cache_projects: int = Field(default=32, ge=1, le=10_000)
    # Consumer group of the active-learning consumer (PredictionLogged → new items).
    active_learning_group: str = Field(
        default=LABELING_ACTIVE_LEARNING.default, pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$"
    )
    # Consumer group of the feedback consumer (FeedbackRecorded → review items, SFT answers, preference pairs).
    feedback_group: str = Field(default=LABELING_FEEDBACK.default, pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")
    # Where the registry's gRPC API listens: projects with a token limit count with a base model's tokenizer.
    registry_address: str = default_address("registry")
    # Seconds a registry call may take (checking a project's tokenizer, starting an import that counts tokens).
    registry_timeout_s: float = Field(default=30.0, gt=0)
    # Downloaded, checksum-verified tokenizer files, one directory per base model content. Empty means
    # <data_dir>/tokenizers.
    tokenizer_cache_dir: Path | None = None
    # Tokenizers kept loaded in memory (least recently used ones are loaded again from the cache directory).
    tokenizer_cache_size: int = Field(default=8, ge=1, le=1_000)

    def resolved_tokenizer_cache_dir(self) -> Path:
        return self.tokenizer_cache_dir or self.data_dir / "tokenizers"
