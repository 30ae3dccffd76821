"""The base model's files on the node a training worker runs on.

The service resolves a base model into a directory on its own host and names that path in the run's config. On
one machine, or on nodes that share a file system, every worker finds the files there. A worker on another node
fetches them from the object store into a cache of its node, each file verified against the checksum the service
verified it with, and uses that copy.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Mapping
from pathlib import Path

from gristmill.core.base_models import content_sha256
from gristmill.core.manifests import FileEntry, download_files
from gristmill.core.settings import S3Settings
from gristmill.core.storage import ObjectStore

# A node's cache of base models (by content checksum), shared by the workers of every job on that node.
NODE_CACHE = Path(tempfile.gettempdir()) / "gristmill-base-models"


def node_model_dir(
    model_dir: str,
    files: Mapping[str, FileEntry],
    store: S3Settings | None,
    *,
    cache_dir: Path = NODE_CACHE,
    objects: ObjectStore | None = None,
) -> Path:
    """``model_dir`` when this node has the model's files there; otherwise the files fetched from the object store
    into ``cache_dir``/<content sha256> (once per node: workers of one node take turns through a lock file).

    ``files`` is empty for a model given by local path (it exists only where the service runs: a shared file system
    is then required); ``store`` is None in the embedded mode, whose workers share the service's host."""
    path = Path(model_dir)
    if not files or all((path / name).is_file() for name in files):
        return path
    if store is None and objects is None:
        raise FileNotFoundError(
            f"base model directory {model_dir!r} is not on this node and no object store is configured to fetch it "
            "from; give the training service an S3 endpoint, or share the directory with every Ray node"
        )
    if objects is None:
        from gristmill.core.storage.s3 import S3ObjectStore

        assert store is not None
        objects = S3ObjectStore(store)
    digest = content_sha256({name: entry.sha256 for name, entry in files.items()})
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return download_files(objects, files, cache_dir / digest)
