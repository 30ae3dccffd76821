"""Object storage: one interface (``ObjectStore``), a local-disk and an S3 implementation.

``open_object_store`` picks the implementation from settings: an S3 endpoint when one is configured,
otherwise a directory under the service's data directory (embedded mode).
"""

from __future__ import annotations

from pathlib import Path

from gristmill.core.settings import S3Settings
from gristmill.core.storage.base import ObjectInfo, ObjectStore, object_key, validate_key
from gristmill.core.storage.local import LocalObjectStore

__all__ = ["LocalObjectStore", "ObjectInfo", "ObjectStore", "object_key", "open_object_store", "validate_key"]


def open_object_store(settings: S3Settings, data_dir: Path) -> ObjectStore:
    if settings.endpoint:
        # Imported here: minio is an optional extra (gristmill-libs[s3]).
        from gristmill.core.storage.s3 import S3ObjectStore

        return S3ObjectStore(settings)
    return LocalObjectStore(Path(data_dir) / "objects")
