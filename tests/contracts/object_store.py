"""One conformance suite for every ``ObjectStore`` implementation.

Subclasses provide a ``store`` fixture (a fresh, empty store) and a ``corrupt`` fixture: a function
that changes an object's stored bytes behind the store's back, as a disk or a bucket could.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from gristmill.core.errors import AlreadyExistsError, DataIntegrityError, InvalidArgumentError, NotFoundError
from gristmill.core.storage import ObjectStore

BAD_KEYS = ["", "../x", "a/../b", "/abs", "a//b", "a\x00b", "a/./b", "trailing/", ".hidden", "sp ace", "a\nb"]


class ObjectStoreContract:
    def test_bytes_round_trip_records_checksum(self, store: ObjectStore) -> None:
        info = store.put_bytes("datasets/p1/v1/train.jsonl", b'{"text": "hi"}\n', content_type="application/jsonl")
        assert info.size == 15
        assert info.sha256 == hashlib.sha256(b'{"text": "hi"}\n').hexdigest()
        assert store.get_bytes("datasets/p1/v1/train.jsonl") == b'{"text": "hi"}\n'
        stat = store.stat("datasets/p1/v1/train.jsonl")
        assert (stat.size, stat.sha256, stat.content_type) == (15, info.sha256, "application/jsonl")

    def test_file_round_trip(self, store: ObjectStore, tmp_path: Path) -> None:
        src = tmp_path / "model.safetensors"
        src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, more than one read chunk
        info = store.put_file("models/m/1/model.safetensors", src)
        dest = tmp_path / "out" / "model.safetensors"
        got = store.get_file("models/m/1/model.safetensors", dest, expected_sha256=info.sha256)
        assert dest.read_bytes() == src.read_bytes()
        assert got.sha256 == info.sha256

    def test_objects_are_immutable(self, store: ObjectStore) -> None:
        store.put_bytes("a/b", b"one")
        with pytest.raises(AlreadyExistsError, match="immutable"):
            store.put_bytes("a/b", b"two")
        assert store.get_bytes("a/b") == b"one"
        store.put_bytes("a/b", b"two", overwrite=True)
        assert store.get_bytes("a/b") == b"two"

    def test_missing_object_is_not_found(self, store: ObjectStore, tmp_path: Path) -> None:
        with pytest.raises(NotFoundError, match="does not exist"):
            store.get_bytes("no/such/object")
        with pytest.raises(NotFoundError):
            store.get_file("no/such/object", tmp_path / "x")
        assert not (tmp_path / "x").exists()
        assert store.exists("no/such/object") is False

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_invalid_keys_are_refused_and_write_nothing(self, store: ObjectStore, key: str) -> None:
        with pytest.raises(InvalidArgumentError):
            store.put_bytes(key, b"x")
        with pytest.raises(InvalidArgumentError):
            store.get_bytes(key)
        assert list(store.list()) == []

    def test_corrupted_object_is_refused(
        self, store: ObjectStore, corrupt: Callable[[str, bytes], None], tmp_path: Path
    ) -> None:
        store.put_bytes("models/m/1/config.json", b'{"hidden_size": 32}')
        corrupt("models/m/1/config.json", b'{"hidden_size": 99}')
        with pytest.raises(DataIntegrityError, match="corrupted"):
            store.get_bytes("models/m/1/config.json")
        dest = tmp_path / "config.json"
        with pytest.raises(DataIntegrityError):
            store.get_file("models/m/1/config.json", dest)
        assert not dest.exists(), "a refused download must leave nothing behind"

    def test_expected_checksum_mismatch_is_refused(self, store: ObjectStore) -> None:
        store.put_bytes("k", b"data")
        with pytest.raises(DataIntegrityError, match="manifest"):
            store.get_bytes("k", expected_sha256="0" * 64)

    def test_list_by_prefix_in_key_order(self, store: ObjectStore) -> None:
        for key in ["m/2/b", "m/1/a", "n/1/a", "m/1/c"]:
            store.put_bytes(key, key.encode())
        assert [o.key for o in store.list("m/")] == ["m/1/a", "m/1/c", "m/2/b"]
        assert [o.key for o in store.list()] == ["m/1/a", "m/1/c", "m/2/b", "n/1/a"]

    def test_delete(self, store: ObjectStore) -> None:
        store.put_bytes("x/y", b"1")
        store.delete("x/y")
        assert not store.exists("x/y")
        store.delete("x/y")  # deleting twice is fine
