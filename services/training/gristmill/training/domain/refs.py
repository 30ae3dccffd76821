"""References to things outside the job: objects, the dataset version, the base model."""

from __future__ import annotations

from dataclasses import dataclass

from gristmill.core.values import FileRef

__all__ = ["BaseModelRef", "DatasetRef", "FileRef"]


@dataclass(frozen=True)
class BaseModelRef:
    """Exactly one of ``name`` (registry base model), ``object_prefix`` or ``local_path`` is set."""

    name: str = ""
    object_prefix: str = ""
    local_path: str = ""
    # SHA-256 over the file list and file checksums, computed when the files were read.
    content_sha256: str = ""

    def describe(self) -> str:
        if self.name:
            return f"base model {self.name!r}"
        if self.object_prefix:
            return f"base model at object prefix {self.object_prefix!r}"
        return f"base model at local path {self.local_path!r}"


@dataclass(frozen=True)
class DatasetRef:
    project_id: str
    dataset_version_id: str
    # The manifest the service resolved and verified (filled in at submit time).
    manifest: FileRef | None = None
