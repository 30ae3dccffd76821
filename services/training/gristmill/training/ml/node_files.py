"""The files a training worker reads, on the node it runs on: the base model's, and the checkpoint it resumes from.

The service resolves a base model into a directory on its own host and names that path in the run's config. On
one machine, or on nodes that share a file system, every worker finds the files there. A worker on another node
fetches them from the object store into a cache of its node, each file verified against the checksum the service
verified it with, and uses that copy.

A restarted worker group resumes from its latest checkpoint in the run's storage. Every worker of a node reads the
same checkpoint, so the node downloads it once (``node_checkpoint``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gristmill.core.base_models import content_sha256
from gristmill.core.manifests import FileEntry, download_files
from gristmill.core.settings import S3Settings
from gristmill.core.storage import ObjectStore

# A node's cache of base models (by content checksum), shared by the workers of every job on that node.
NODE_CACHE = Path(tempfile.gettempdir()) / "gristmill-base-models"
# A node's downloads of remote checkpoints being restored, each kept while a worker of the node reads it.
RESTORE_DIR = Path(tempfile.gettempdir()) / "gristmill-restores"


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
    with _locked(cache_dir / f".{digest}.lock"):
        return download_files(objects, files, cache_dir / digest)


@contextlib.contextmanager
def node_checkpoint(checkpoint: Any, *, root: Path | None = None) -> Iterator[Path]:
    """A local directory holding the remote Ray ``checkpoint`` (a ``ray.train.Checkpoint``), downloaded once for
    all the workers of this node that read it at the same time, and removed when the last of them is done.

    Why not Ray's ``Checkpoint.as_directory``, which also shares a download per node: a process that arrives after
    another's download has finished downloads again into the same directory, over the files the first one is
    reading (ray-project/ray#48726); a restarted group failed its restore with "PytorchStreamReader failed reading
    file" and was restarted again. Here a download happens in a staging directory renamed into place once complete,
    under a lock file, and a complete directory is never written again. Each reader leaves a file named by its
    process id beside it while it reads; the last one out (readers whose process has died do not count) removes
    the download. A checkpoint's directory in the run's storage never changes once reported, so its file system and
    path name its contents. One lock serves the node's restores (a lock file per checkpoint would be left behind
    by each): two jobs restoring on one node at once take turns downloading."""
    root = root or RESTORE_DIR
    name = f"{checkpoint.filesystem.type_name}:{checkpoint.path}"
    key = hashlib.sha256(name.encode()).hexdigest()[:24]
    root.mkdir(parents=True, exist_ok=True)
    # Beside the download, not in it: the loop reads the checkpoint's files and nothing else.
    dest, complete, readers = root / key, root / f".{key}.complete", root / f".{key}.readers"
    me = readers / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with _locked(root / ".lock"):
        if not complete.is_file():
            # Nobody reads ``dest`` without the mark (readers register below, after it): left by a process killed
            # before marking it, it is replaced.
            staging = root / f".{key}.download-{uuid.uuid4().hex[:8]}"
            try:
                checkpoint.to_directory(str(staging))
                shutil.rmtree(dest, ignore_errors=True)
                staging.rename(dest)
                complete.write_text(name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        readers.mkdir(exist_ok=True)
        me.touch()
    try:
        yield dest
    finally:
        with _locked(root / ".lock"):
            me.unlink(missing_ok=True)
            if not any(_alive(reader) for reader in readers.iterdir()):
                complete.unlink(missing_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(readers, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(reader: Path) -> bool:
    """Whether the process that left the reader file ``reader`` (``<pid>-<nonce>``) is still running."""
    try:
        os.kill(int(reader.name.split("-", 1)[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge: another user's process, or a name we did not write
    return True
