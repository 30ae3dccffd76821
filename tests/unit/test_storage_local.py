from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.settings import S3Settings
from gristmill.core.storage import LocalObjectStore, object_key, open_object_store
from tests.contracts.object_store import ObjectStoreContract


class TestLocalObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalObjectStore:
        return LocalObjectStore(tmp_path / "objects")

    @pytest.fixture
    def corrupt(self, store: LocalObjectStore) -> Callable[[str, bytes], None]:
        def _corrupt(key: str, data: bytes) -> None:
            (store.root / key).write_bytes(data)

        return _corrupt


def test_object_key_joins_validated_segments() -> None:
    assert object_key("models", "sentiment", "3", "config.json") == "models/sentiment/3/config.json"
    with pytest.raises(InvalidArgumentError, match=r"'\.\.'"):
        object_key("models", "..", "x")


def test_open_object_store_defaults_to_local_disk(tmp_path: Path) -> None:
    store = open_object_store(S3Settings(endpoint=""), tmp_path)
    assert isinstance(store, LocalObjectStore)
    assert store.root == tmp_path / "objects"
