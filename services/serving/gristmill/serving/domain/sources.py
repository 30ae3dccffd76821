"""Where models come from and what a loaded model offers, as small interfaces.

``ModelSource`` resolves a registered model + version/alias to a concrete version and fetches its files
(checksums verified); the real one asks the registry (``runtime.sources.RegistryModelSource``), tests use a
local directory. ``ModelLoader`` turns fetched files into a ``Classifier``: tokenization and a batched
forward pass. The domain only sees these interfaces, so its rules run with a fake model in unit tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gristmill.core.values import TensorSpec
from gristmill.serving.domain.explanations import Explanation
from gristmill.serving.domain.generation import GenerativeModel
from gristmill.serving.domain.model import Quantization, VersionSelector

TASK_SINGLE_LABEL = "TASK_TYPE_TEXT_CLASSIFICATION"
TASK_MULTI_LABEL = "TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION"
# A version whose directory has this file is a PEFT LoRA adapter; its source fetches the base model beside it,
# as the directory (or link) ``BASE_DIR`` inside the version's directory.
ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"


@dataclass(frozen=True)
class ModelFile:
    """One artifact: its name in the model directory, where it is stored, how to verify it."""

    name: str
    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ResolvedVersion:
    """One concrete version of a registered model, as its source describes it."""

    registered_model_name: str
    version: int
    files: tuple[ModelFile, ...] = ()
    # The alias the selector named (empty when it named a version).
    resolved_alias: str = ""
    # Label names in class-index order; empty means "take them from the model's config".
    label_map: tuple[str, ...] = ()
    task: str = TASK_SINGLE_LABEL
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    # From the version's lineage: the labeling project its dataset came from, and the training length.
    labeling_project_id: str = ""
    max_sequence_length: int = 0
    # From the lineage: the registry base model the version was trained from (an adapter needs it to load).
    base_model_name: str = ""
    base_model_sha256: str = ""
    # The SHA-256 of the chat template training rendered with (lineage ``chat_template.sha256``); "" if unknown.
    chat_template_sha256: str = ""
    # Source-specific details (e.g. the local directory of a test source).
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


class ModelSource(ABC):
    """Resolves and fetches model versions. Both methods block (network, disk): call them off the event loop.

    Errors: ``NotFoundError`` (unknown model, version or alias), ``FailedPreconditionError`` (the version is
    not READY), ``DataIntegrityError`` (a file does not match its checksum), ``UnavailableError`` (the
    registry or the object store cannot be reached).
    """

    @abstractmethod
    def resolve(self, organization_id: str, registered_model_name: str, selector: VersionSelector) -> ResolvedVersion:
        """The version ``selector`` names now (an alias resolves to its current version)."""

    @abstractmethod
    def fetch(self, resolved: ResolvedVersion) -> Path:
        """A local directory holding every file of ``resolved``, each verified against its sha256."""

    def model_exists(self, organization_id: str, registered_model_name: str) -> bool:
        """Whether the registered model exists, so that a deployment may follow an alias that is not set yet.

        Sources that cannot tell answer False: a deployment's alias must then exist when it is created.
        """
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Safe to call twice."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized text: what the batcher groups by length and the model consumes."""

    ids: Sequence[int]
    # Tokens the text had before truncation (special tokens included).
    full_length: int

    @property
    def length(self) -> int:
        return len(self.ids)


class Classifier(Protocol):
    """A loaded text classifier. ``encode`` is cheap; both are thread-safe (batches may run side by side)."""

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def multi_label(self) -> bool: ...

    @property
    def max_tokens(self) -> int:
        """The most tokens per text the model accepts (its position limit)."""
        ...

    def encode(self, texts: Sequence[str], max_tokens: int) -> list[Encoded]:
        """Tokenize, truncating each text to ``max_tokens`` (``full_length`` keeps the untruncated count)."""
        ...

    def predict(self, batch: Sequence[Encoded]) -> Sequence[Sequence[float]]:
        """Probabilities per text and label (softmax, or sigmoid for multi-label), in order."""
        ...

    def light_load_thread_setup(self, share: int) -> Callable[[], None] | None:
        """Sets up a thread to run a batch on the cores of ``share`` batch slots (the batch runs alone at light
        load); None when the model cannot use more cores than one slot's."""
        ...

    def explain(
        self, texts: Sequence[str], max_tokens: int, label_indices: Sequence[int], steps: int
    ) -> list[Explanation]:
        """Per-token attributions of each text to its label (``label_indices``, in order). Slow: a thread's job.

        ``FailedPreconditionError`` when the loaded model cannot be explained (a quantised one has no gradients).
        """
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...


@dataclass(frozen=True)
class LoadOptions:
    quantization: Quantization = Quantization.NONE


class ModelLoader(Protocol):
    """Builds a warmed-up runtime from a fetched directory: a ``Classifier``, or a ``GenerativeModel``
    (``domain.generation``) for a causal LM. Blocks: call it off the event loop."""

    def __call__(
        self, directory: Path, resolved: ResolvedVersion, options: LoadOptions
    ) -> Classifier | GenerativeModel: ...
