from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gristmill.core.errors import DataIntegrityError, InvalidArgumentError
from gristmill.core.manifests import DatasetManifest, DatasetRow, FileEntry, ModelManifest, SplitFile
from gristmill.core.storage import LocalObjectStore


def _dataset(store: LocalObjectStore) -> DatasetManifest:
    rows = [DatasetRow("i1", "great phone", "positive"), DatasetRow("i2", "awful", "negative")]
    body = "\n".join(r.to_json() for r in rows).encode() + b"\n"
    info = store.put_bytes("datasets/p/1/train.jsonl", body)
    split = SplitFile(FileEntry(info.key, info.sha256, info.size), 2, {"positive": 1, "negative": 1})
    return DatasetManifest(
        project_id="p",
        dataset_version_id="dv1",
        version_number=1,
        task_type="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=["negative", "positive"],
        schema_version=1,
        splits={"train": split},
        seed=7,
        ratios={"train": 1.0},
        created_at="2026-11-29T00:00:00Z",
    )


def test_dataset_manifest_round_trip_and_rows(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    manifest = _dataset(store)
    again = DatasetManifest.from_json(manifest.to_json())
    assert again == manifest
    assert [r.label for r in again.read_rows(store, "train")] == ["positive", "negative"]


def test_multi_label_rows_round_trip() -> None:
    row = DatasetRow("i", "text", labels=("a", "b"))
    assert DatasetRow.from_json(row.to_json(), where="x") == row


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"format": "other"}', "has format 'other'"),
        (b'{"format": "gristmill.dataset.v1"}', "malformed"),
    ],
)
def test_bad_dataset_manifests_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        DatasetManifest.from_json(data)


def test_tampered_split_file_is_refused(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    manifest = _dataset(store)
    store.put_bytes("datasets/p/1/train.jsonl", b'{"id":"x","text":"y","label":"positive"}\n', overwrite=True)
    with pytest.raises(DataIntegrityError, match="does not match its manifest"):
        list(manifest.read_rows(store, "train"))


def test_bad_row_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"train\.jsonl line 3"):
        DatasetRow.from_json('{"id": "1"}', where="train.jsonl line 3")


def test_model_manifest_download_verifies_each_file(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    config = store.put_bytes("models/m/1/config.json", b"{}")
    manifest = ModelManifest(
        files={"config.json": FileEntry(config.key, config.sha256, config.size)},
        task_type="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=["a", "b"],
        signature={},
        lineage={"job": "j1"},
    )
    assert ModelManifest.from_json(manifest.to_json()) == manifest
    out = manifest.download(store, tmp_path / "out")
    assert (out / "config.json").read_bytes() == b"{}"
    bad = ModelManifest(
        files={"config.json": FileEntry(config.key, hashlib.sha256(b"x").hexdigest(), 1)},
        task_type="t",
        label_map=[],
        signature={},
        lineage={},
    )
    with pytest.raises(DataIntegrityError):
        bad.download(store, tmp_path / "out2")
    assert not (tmp_path / "out2" / "config.json").exists()


def test_model_manifest_refuses_unsafe_file_names() -> None:
    raw = (
        b'{"format": "gristmill.model.v1", "files": {"../x": {"key": "a", "sha256": "0", "size_bytes": 1}},'
        b' "task_type": "t", "label_map": [], "signature": {}, "lineage": {}}'
    )
    with pytest.raises(InvalidArgumentError):
        ModelManifest.from_json(raw)
