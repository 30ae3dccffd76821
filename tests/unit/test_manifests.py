from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from gristmill.core.errors import DataIntegrityError, InvalidArgumentError
from gristmill.core.manifests import (
    DatasetManifest,
    DatasetRow,
    FileEntry,
    ModelManifest,
    SplitFile,
    download_files,
    upload_files,
)
from gristmill.core.storage import LocalObjectStore, base


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


def test_a_cached_hash_is_reused_while_the_file_is_unchanged_and_redone_once_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = base.sha256_file
    monkeypatch.setattr(base, "sha256_file", lambda path: reads.append(path) or real(path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = base.sha256_file_cached(weights)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and len(reads) == 1
    # Just written: a change in the same clock tick could leave its times as they are, so it is not remembered.
    assert base.sha256_file_cached(weights) == first and len(reads) == 2
    time.sleep(base.RACY_S + 0.05)
    assert base.sha256_file_cached(weights) == first and len(reads) == 3
    assert base.sha256_file_cached(weights) == first and len(reads) == 3  # remembered, not read again
    # Rewritten in place with the same size and its old mtime put back: the ctime still moves, so it is read.
    before = weights.stat()
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert base.sha256_file_cached(weights) == hashlib.sha256(b"b" * 1000).hexdigest() and len(reads) == 4


def test_download_files_replaces_a_cached_file_changed_since_it_was_verified(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    stored = store.put_bytes("models/m/1/model.bin", b"weights")
    files = {"model.bin": FileEntry(stored.key, stored.sha256, stored.size)}
    dest = download_files(store, files, tmp_path / "cache")
    assert download_files(store, files, dest) == dest  # verified, then remembered
    (dest / "model.bin").write_bytes(b"tamper!")  # same size
    assert (download_files(store, files, dest) / "model.bin").read_bytes() == b"weights"


def test_a_model_directory_uploads_with_its_manifest_and_downloads_the_same(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"w" * 100)
    (model / "optimizer.pt").write_bytes(b"loop state")
    entries = upload_files(store, model, "jobs/j1", skip=lambda relative: relative.name == "optimizer.pt")
    assert sorted(entries) == ["config.json", "sub/weights.bin"], "skipped files are neither uploaded nor listed"
    assert entries["sub/weights.bin"] == FileEntry(
        "jobs/j1/sub/weights.bin", hashlib.sha256(b"w" * 100).hexdigest(), 100
    )
    assert not store.exists("jobs/j1/optimizer.pt")
    manifest = ModelManifest(entries, "TASK_TYPE_TEXT_CLASSIFICATION", ["a", "b"], {}, {"training_job_id": "j1"})
    ref = manifest.put(store, "jobs/j1")
    assert ref.key == "jobs/j1/manifest.json" and ref.sha256 == hashlib.sha256(manifest.to_json()).hexdigest()
    read = ModelManifest.from_json(store.get_bytes(ref.key))
    assert read == manifest
    dest = read.download(store, tmp_path / "copy")
    assert (dest / "sub" / "weights.bin").read_bytes() == b"w" * 100 and (dest / "config.json").read_text() == "{}"
    # Publishing again (a retried job) replaces the objects rather than failing on them.
    (model / "config.json").write_text('{"v": 2}')
    again = upload_files(store, model, "jobs/j1")
    assert store.get_bytes(again["config.json"].key) == b'{"v": 2}'
    assert manifest.put(store, "jobs/j1") == ref
