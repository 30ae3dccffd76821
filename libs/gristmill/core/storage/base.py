"""The object store interface and what every implementation shares.

Objects are immutable and checksummed: ``put_*`` records the sha256 of what was written, ``get_*``
recomputes it over what was read and refuses a mismatch (``DataIntegrityError``), and writing to an
existing key is refused unless ``overwrite=True``. Keys are only ever built from validated segments
(``object_key``) so a raw user string never becomes a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gristmill.core.errors import DataIntegrityError, InvalidArgumentError

MAX_KEY_LENGTH = 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,254}$")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object."""

    key: str
    size: int
    sha256: str
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key; raise ``InvalidArgumentError`` saying why not.

    A key is '/'-separated segments, each starting with a letter or digit and made of letters,
    digits, '.', '_', '=' and '-'; no empty segment, no '..', no leading '/', no control characters.
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError("object key must not be empty")
    if "\x00" in key or any(ord(c) < 0x20 for c in key):
        raise InvalidArgumentError("object key must not contain NUL or control characters")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgumentError(f"object key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgumentError(
                f"object key {key[:80]!r} has an empty, '.' or '..' segment; keys are relative paths like 'a/b/c'"
            )
        if not _SEGMENT.fullmatch(segment) or ".." in segment:
            raise InvalidArgumentError(
                f"object key segment {segment[:80]!r} is not allowed: use letters, digits, '.', '_', '=' or '-', "
                "starting with a letter or digit"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: '' or a valid key, optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/"))
    return prefix


def object_key(*segments: str) -> str:
    """Join validated segments into a key: ``object_key("models", name, "3", "config.json")``."""
    return validate_key("/".join(segments))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# (device, inode, size, mtime, ctime) of a file hashed in this process -> its sha256.
_VERIFIED: dict[tuple[int, int, int, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()
_VERIFIED_MAX = 4096
# A file changed less than this long before it was hashed is not remembered. File times come from a clock that
# ticks every few milliseconds, so a change made in the same tick as an earlier one can leave every time as it
# was; once a file's times are older than this, any change moves its ctime ("racy git" has the same rule).
RACY_S = 0.1


def sha256_file_cached(path: Path) -> str:
    """``sha256_file``, remembered in this process for as long as the file's device, inode, size, mtime and ctime
    stay the same (as ``git status`` and ``rsync`` decide a file is unchanged: rewriting or touching a file moves
    its ctime, even when its mtime is put back).

    For the multi-gigabyte model files a service reads again and again from its own cache: re-hashing a 3 GB base
    model on every job took seconds, twice per job (at submission and when it runs)."""
    started = time.time()
    key = _stat_key(path)
    if key is None:
        return sha256_file(path)  # raises the error a caller expects from opening it
    with _VERIFIED_LOCK:
        known = _VERIFIED.get(key)
    if known is not None:
        return known
    digest = sha256_file(path)
    settled = max(key[3], key[4]) < (started - RACY_S) * 1e9
    # Stat again: a file written while it was being hashed keeps no entry (its digest may mix old and new bytes).
    if settled and _stat_key(path) == key:
        with _VERIFIED_LOCK:
            if len(_VERIFIED) >= _VERIFIED_MAX:
                _VERIFIED.clear()
            _VERIFIED[key] = digest
    return digest


def _stat_key(path: Path) -> tuple[int, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    """Copy ``src`` to ``dst``; return (bytes copied, sha256 hex)."""
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def verify(key: str, actual_sha256: str, recorded_sha256: str, expected_sha256: str | None) -> None:
    """Refuse data whose checksum differs from what was recorded at write time or what the caller expects."""
    if recorded_sha256 and actual_sha256 != recorded_sha256:
        raise DataIntegrityError(
            f"object {key!r} is corrupted: its sha256 is {actual_sha256[:12]}…, "
            f"but {recorded_sha256[:12]}… was recorded when it was written"
        )
    if expected_sha256 and actual_sha256 != expected_sha256:
        raise DataIntegrityError(
            f"object {key!r} does not match its manifest: "
            f"sha256 {actual_sha256[:12]}…, expected {expected_sha256[:12]}…"
        )
    if not recorded_sha256 and not expected_sha256:
        raise DataIntegrityError(f"object {key!r} has no recorded checksum; it was not written by Gristmill")


def download_verified(
    key: str, dest: Path, fetch: Callable[[Path], object], recorded_sha256: str, expected_sha256: str | None
) -> None:
    """``fetch`` the object into a temporary file beside ``dest``, verify it, then move it into place.

    ``dest`` appears only once verified; a failed or refused download leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fetch(tmp)
        verify(key, sha256_file(tmp), recorded_sha256, expected_sha256)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ObjectStore(ABC):
    """Immutable, checksummed objects under validated keys.

    Errors: ``InvalidArgumentError`` for a bad key, ``NotFoundError`` for a missing object,
    ``AlreadyExistsError`` when writing an existing key without ``overwrite``,
    ``DataIntegrityError`` when what is read does not match its checksum, ``UnavailableError`` when
    the back-end cannot be reached.
    """

    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        overwrite: bool = False,
    ) -> ObjectInfo: ...

    @abstractmethod
    def put_file(
        self, key: str, path: Path, *, content_type: str = "application/octet-stream", overwrite: bool = False
    ) -> ObjectInfo: ...

    @abstractmethod
    def get_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        """The object's bytes, verified against the recorded (and, if given, the expected) sha256."""

    @abstractmethod
    def get_file(self, key: str, dest: Path, *, expected_sha256: str | None = None) -> ObjectInfo:
        """Download to ``dest`` (via a temporary file: ``dest`` appears only once verified)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (used for retention and cleanup, never to 'edit' one)."""

    def exists(self, key: str) -> bool:
        from gristmill.core.errors import NotFoundError

        try:
            self.stat(key)
        except NotFoundError:
            return False
        return True
