"""Local-disk object store (embedded mode, unit tests).

An object lives at ``<root>/<key>``; its checksum and content type at ``<root>/.meta/<key>.json``.
Writes go to a temporary file that is renamed into place, so a crash never leaves half an object.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gristmill.core.errors import AlreadyExistsError, NotFoundError
from gristmill.core.storage.base import (
    ObjectInfo,
    ObjectStore,
    copy_hashing,
    download_verified,
    validate_key,
    validate_prefix,
    verify,
)

_META_DIR = ".meta"


class LocalObjectStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / _META_DIR).mkdir(parents=True, exist_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        validate_key(key)
        return self.root / key, self.root / _META_DIR / f"{key}.json"

    def _write(self, key: str, src: Path | bytes, content_type: str, overwrite: bool) -> ObjectInfo:
        path, meta = self._paths(key)
        if not overwrite and meta.exists():
            raise AlreadyExistsError(f"object {key!r} already exists; objects are immutable")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(src, bytes):
                    out.write(src)
                    size, digest = len(src), hashlib.sha256(src).hexdigest()
                else:
                    with src.open("rb") as fh:
                        size, digest = copy_hashing(fh, out)
                out.flush()
                os.fsync(out.fileno())
            info = ObjectInfo(key=key, size=size, sha256=digest, content_type=content_type)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # The metadata file is written last: an object without it does not exist for readers.
        _atomic_write_text(meta, json.dumps({"size": size, "sha256": digest, "content_type": content_type}))
        return info

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        overwrite: bool = False,
    ) -> ObjectInfo:
        return self._write(key, data, content_type, overwrite)

    def put_file(
        self, key: str, path: Path, *, content_type: str = "application/octet-stream", overwrite: bool = False
    ) -> ObjectInfo:
        return self._write(key, Path(path), content_type, overwrite)

    def stat(self, key: str) -> ObjectInfo:
        path, meta = self._paths(key)
        if not meta.exists() or not path.exists():
            raise NotFoundError(f"object {key!r} does not exist")
        recorded = json.loads(meta.read_text())
        return ObjectInfo(
            key=key,
            size=int(recorded["size"]),
            sha256=str(recorded["sha256"]),
            content_type=recorded["content_type"],
        )

    def get_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        info = self.stat(key)
        data = (self.root / key).read_bytes()
        verify(key, hashlib.sha256(data).hexdigest(), info.sha256, expected_sha256)
        return data

    def get_file(self, key: str, dest: Path, *, expected_sha256: str | None = None) -> ObjectInfo:
        info = self.stat(key)
        download_verified(
            key, Path(dest), lambda tmp: shutil.copyfile(self.root / key, tmp), info.sha256, expected_sha256
        )
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        meta_root = self.root / _META_DIR
        keys = sorted(
            p.relative_to(meta_root).as_posix()[: -len(".json")] for p in meta_root.rglob("*.json") if p.is_file()
        )
        for key in keys:
            if key.startswith(prefix):
                yield self.stat(key)

    def delete(self, key: str) -> None:
        path, meta = self._paths(key)
        meta.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp_name, path)
