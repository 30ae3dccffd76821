"""S3 object store through the ``minio`` SDK: SeaweedFS locally and in CI, MinIO or AWS S3 by configuration.

The sha256 of every object is stored as user metadata (``x-amz-meta-sha256``) at write time and
recomputed on every read.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from gristmill.core.errors import AlreadyExistsError, NotFoundError, UnavailableError
from gristmill.core.settings import S3Settings
from gristmill.core.storage.base import (
    ObjectInfo,
    ObjectStore,
    download_verified,
    sha256_file,
    validate_key,
    validate_prefix,
    verify,
)

_SHA_META = "sha256"
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}


class S3ObjectStore(ObjectStore):
    """Objects in one bucket, optionally under a key prefix (several installs can share a bucket)."""

    def __init__(self, settings: S3Settings, *, prefix: str = "", create_bucket: bool = True) -> None:
        # Fail fast instead of minio's default of retrying for minutes when the server is down.
        http = urllib3.PoolManager(
            # Services download several model files at once; the default pool of 1 would churn connections.
            maxsize=10,
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )
        self.bucket = settings.bucket
        self._prefix = validate_key(prefix.strip("/")) + "/" if prefix else ""
        self._endpoint = settings.endpoint
        if create_bucket:
            self._call(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a client call, turning transport failures into ``UnavailableError``."""
        try:
            return fn(*args, **kwargs)
        except S3Error:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise UnavailableError(f"the S3 server at {self._endpoint} cannot be reached: {exc}") from None

    def _name(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def _check_absent(self, key: str, overwrite: bool) -> None:
        if not overwrite and self.exists(key):
            raise AlreadyExistsError(f"object {key!r} already exists; objects are immutable")

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        overwrite: bool = False,
    ) -> ObjectInfo:
        name = self._name(key)
        self._check_absent(key, overwrite)
        digest = hashlib.sha256(data).hexdigest()
        self._call(
            self._client.put_object,
            self.bucket,
            name,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={_SHA_META: digest},
        )
        return ObjectInfo(key=key, size=len(data), sha256=digest, content_type=content_type)

    def put_file(
        self, key: str, path: Path, *, content_type: str = "application/octet-stream", overwrite: bool = False
    ) -> ObjectInfo:
        name = self._name(key)
        self._check_absent(key, overwrite)
        path = Path(path)
        digest = sha256_file(path)
        self._call(
            self._client.fput_object,
            self.bucket,
            name,
            str(path),
            content_type=content_type,
            metadata={_SHA_META: digest},
        )
        return ObjectInfo(key=key, size=path.stat().st_size, sha256=digest, content_type=content_type)

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        try:
            st = self._call(self._client.stat_object, self.bucket, name)
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise NotFoundError(f"object {key!r} does not exist") from None
            raise
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        sha = meta.get(f"x-amz-meta-{_SHA_META}", "")
        return ObjectInfo(
            key=key,
            size=int(st.size or 0),
            sha256=sha,
            content_type=st.content_type or "application/octet-stream",
        )

    def get_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        info = self.stat(key)
        response = self._call(self._client.get_object, self.bucket, self._name(key))
        try:
            data: bytes = response.read()
        finally:
            response.close()
            response.release_conn()
        verify(key, hashlib.sha256(data).hexdigest(), info.sha256, expected_sha256)
        return data

    def get_file(self, key: str, dest: Path, *, expected_sha256: str | None = None) -> ObjectInfo:
        info = self.stat(key)
        name = self._name(key)
        download_verified(
            key,
            Path(dest),
            lambda tmp: self._call(self._client.fget_object, self.bucket, name, str(tmp)),
            info.sha256,
            expected_sha256,
        )
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        objects = self._call(self._client.list_objects, self.bucket, prefix=self._prefix + prefix, recursive=True)
        names = sorted(obj.object_name for obj in objects if obj.object_name)
        for name in names:
            yield self.stat(name[len(self._prefix) :])

    def delete(self, key: str) -> None:
        self._call(self._client.remove_object, self.bucket, self._name(key))
