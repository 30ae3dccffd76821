"""A Ray worker on a node that does not see the service's copy of a base model fetches it from the real S3 server."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from gristmill.core.errors import DataIntegrityError
from gristmill.core.manifests import FileEntry
from gristmill.core.settings import S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.training.ml.node_files import node_model_dir
from services.training.tests.integration.test_ray_training import s3  # noqa: F401  # fixture

pytestmark = pytest.mark.integration


def _upload(objects: S3ObjectStore, prefix: str, contents: dict[str, bytes]) -> dict[str, FileEntry]:
    files = {}
    for name, data in contents.items():
        objects.put_bytes(f"{prefix}/{name}", data)
        files[name] = FileEntry(key=f"{prefix}/{name}", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    return files


def test_a_node_without_the_directory_fetches_verified_files_once(
    s3: S3Settings,  # noqa: F811
    tmp_path: Path,
) -> None:
    objects = S3ObjectStore(s3)
    prefix = f"base-models/it-{uuid.uuid4().hex[:8]}"
    contents = {"config.json": b'{"model_type": "llama"}', "tokenizer/vocab.json": b'{"a": 0}'}
    files = _upload(objects, prefix, contents)
    cache = tmp_path / "node-cache"

    fetched = node_model_dir(str(tmp_path / "on-the-service-host"), files, s3, cache_dir=cache)

    assert fetched.parent == cache
    assert {name: (fetched / name).read_bytes() for name in contents} == contents
    # The next worker on this node reuses the copy (after checking it), even with the object gone.
    objects.delete(f"{prefix}/config.json")
    assert node_model_dir(str(tmp_path / "on-the-service-host"), files, s3, cache_dir=cache) == fetched


def test_a_file_whose_object_changed_is_refused(s3: S3Settings, tmp_path: Path) -> None:  # noqa: F811
    objects = S3ObjectStore(s3)
    prefix = f"base-models/it-{uuid.uuid4().hex[:8]}"
    files = _upload(objects, prefix, {"config.json": b"{}"})
    objects.put_bytes(f"{prefix}/config.json", b'{"tampered": true}', overwrite=True)
    with pytest.raises(DataIntegrityError):
        node_model_dir("/nonexistent/base-model", files, s3, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "config.json").exists()


def test_the_services_directory_is_used_where_the_node_sees_it(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    entry = FileEntry(key="base-models/x/config.json", sha256="0" * 64, size_bytes=2)
    # No object store call: the files are there (the service verified them when it resolved the model).
    assert node_model_dir(str(model), {"config.json": entry}, None) == model
    # A model given by local path has no objects to fetch: its directory is what there is.
    assert node_model_dir(str(tmp_path / "elsewhere"), {}, None) == tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="no object store is configured"):
        node_model_dir(str(tmp_path / "elsewhere"), {"config.json": entry}, None)
