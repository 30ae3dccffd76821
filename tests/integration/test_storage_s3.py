"""The object store conformance suite against the real S3 server (SeaweedFS, started by `make test`)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from gristmill.core.errors import NotFoundError, UnavailableError
from gristmill.core.settings import S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from tests.contracts.object_store import ObjectStoreContract

pytestmark = pytest.mark.integration


def _settings(s3_endpoint: dict[str, str], **overrides: str) -> S3Settings:
    values = {
        "endpoint": s3_endpoint["endpoint"],
        "access_key": s3_endpoint["access_key"],
        "secret_key": SecretStr(s3_endpoint["secret_key"]),
        "bucket": "gristmill-test",
    }
    values.update(overrides)
    return S3Settings(**values)  # type: ignore[arg-type]


class TestS3ObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, s3_endpoint: dict[str, str]) -> S3ObjectStore:
        # A fresh prefix per test keeps tests independent without creating a bucket each time.
        return S3ObjectStore(_settings(s3_endpoint), prefix=f"t-{uuid.uuid4().hex}")

    @pytest.fixture
    def corrupt(self, store: S3ObjectStore) -> Callable[[str, bytes], None]:
        def _corrupt(key: str, data: bytes) -> None:
            # Rewrite the bytes but keep the metadata recorded at write time, as bit rot or a
            # hand-edited object would.
            name = store._name(key)
            client = store._client
            st = client.stat_object(store.bucket, name)
            sha = {k.lower(): v for k, v in st.metadata.items()}["x-amz-meta-sha256"]
            client.put_object(store.bucket, name, io.BytesIO(data), len(data), metadata={"sha256": sha})

        return _corrupt


def test_wrong_credentials_are_refused(s3_endpoint: dict[str, str]) -> None:
    store = S3ObjectStore(_settings(s3_endpoint), prefix=f"t-{uuid.uuid4().hex}")
    store.put_bytes("k", b"v")
    from minio.error import S3Error

    with pytest.raises(S3Error):
        S3ObjectStore(_settings(s3_endpoint, secret_key="wrong"), create_bucket=True)


def test_unreachable_server_is_unavailable() -> None:
    settings = S3Settings(endpoint="127.0.0.1:1", access_key="a", secret_key=SecretStr("b"), bucket="gristmill")
    with pytest.raises(UnavailableError, match="cannot be reached"):
        S3ObjectStore(settings)


def test_missing_object_in_real_bucket(s3_endpoint: dict[str, str]) -> None:
    store = S3ObjectStore(_settings(s3_endpoint), prefix=f"t-{uuid.uuid4().hex}")
    with pytest.raises(NotFoundError):
        store.stat("nothing/here")
