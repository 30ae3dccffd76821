"""The on-store file formats that cross service boundaries, defined once.

- A **dataset version** (written by labeling, read by training):
  ``datasets/<project>/<dataset version id>/{train,validation,test}.jsonl`` plus ``manifest.json``
  (``dataset_split_key``, ``dataset_manifest_key``). Each JSONL line
  is one ``DatasetRow``: ``{"id": ..., "text": ..., "label": ...}`` (single-label) or with
  ``"labels": [...]`` (multi-label).
- A **model** (written by training, verified and copied by the registry, loaded by serving):
  ``<prefix>/{model.safetensors, config.json, tokenizer files, model-card.md}`` plus ``manifest.json``
  listing every file with its sha256.

Both manifests are JSON with a ``format`` tag; readers refuse an unknown format, a missing field or a
file whose checksum differs (``InvalidArgumentError`` / ``DataIntegrityError``), so a corrupt or foreign
manifest never gets as far as training or serving.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.storage import ObjectStore, object_key, validate_key
from gristmill.core.storage.base import sha256_file_cached
from gristmill.core.values import FileRef

DATASET_FORMAT = "gristmill.dataset.v1"
MODEL_FORMAT = "gristmill.model.v1"
SPLITS = ("train", "validation", "test")
# A model's manifest, beside its files.
MODEL_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    """One file of a dataset version or a model: where it is and how to verify it."""

    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class SplitFile:
    file: FileEntry
    # Items in this split: one row each, except a preference item, which publishes one row per ordered pair of
    # its replies, all with the item's id (so readers compare distinct row ids with it).
    count: int
    # Items per label in this split (for multi-label: items carrying the label).
    label_counts: dict[str, int]


@dataclass(frozen=True)
class DatasetRow:
    id: str
    text: str
    label: str | None = None
    labels: tuple[str, ...] = ()

    def to_json(self) -> str:
        row: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.labels:
            row["labels"] = list(self.labels)
        else:
            row["label"] = self.label
        return json.dumps(row, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str, *, where: str) -> DatasetRow:
        return cls.from_object(_loads(line, where), where=where)

    @classmethod
    def from_object(cls, data: Mapping[str, Any], *, where: str) -> DatasetRow:
        """A classification row from one decoded JSONL line (``DatasetRecord.data``)."""
        text, item_id = data.get("text"), data.get("id")
        if not isinstance(text, str) or not isinstance(item_id, str):
            raise InvalidArgumentError(f"{where}: each row needs string fields 'id' and 'text'")
        labels = data.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise InvalidArgumentError(f"{where}: 'labels' must be a list of strings")
            return cls(item_id, text, None, tuple(labels))
        label = data.get("label")
        if not isinstance(label, str):
            raise InvalidArgumentError(f"{where}: each row needs a string 'label' (or a 'labels' list)")
        return cls(item_id, text, label)


@dataclass(frozen=True)
class DatasetRecord:
    """One line of a dataset split, decoded but not interpreted: what a row *is* depends on the version's
    ``row_format`` (``DatasetRow`` for classification, ``gristmill.core.chat`` rows for chat and preference)."""

    # Where the line is ("<key> line <n>"), for error messages.
    where: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class DatasetManifest:
    project_id: str
    dataset_version_id: str
    version_number: int
    task_type: str  # the common.v1.TaskType enum name, e.g. "TASK_TYPE_TEXT_CLASSIFICATION"
    label_map: list[str]
    schema_version: int
    splits: dict[str, SplitFile]
    seed: int
    ratios: dict[str, float]
    created_at: str
    organization_id: str = ""
    format: str = DATASET_FORMAT
    # What a row is: "classification" ({"id", "text", "label(s)"}), "sft-messages" ({"id", "messages"}) or
    # "dpo-conversational" ({"id", "pair", "prompt", "chosen", "rejected"}); see gristmill.core.chat.
    row_format: str = "classification"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str = "dataset manifest") -> DatasetManifest:
        raw = _loads(data.decode("utf-8", errors="strict"), where)
        _check_format(raw, DATASET_FORMAT, where)
        try:
            splits = {
                name: SplitFile(
                    file=FileEntry(**split["file"]), count=int(split["count"]), label_counts=dict(split["label_counts"])
                )
                for name, split in raw["splits"].items()
            }
            manifest = cls(**{**raw, "splits": splits})
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{where} is malformed: {exc}") from None
        for name, split in manifest.splits.items():
            if name not in SPLITS:
                raise InvalidArgumentError(f"{where}: unknown split {name!r}; expected one of {', '.join(SPLITS)}")
            validate_key(split.file.key)
        return manifest

    def read_rows(self, objects: ObjectStore, split: str) -> Iterator[DatasetRow]:
        """The classification rows of one split, read and checksum-verified against this manifest."""
        for record in self.read_records(objects, split):
            yield DatasetRow.from_object(record.data, where=record.where)

    def read_records(self, objects: ObjectStore, split: str) -> Iterator[DatasetRecord]:
        """The lines of one split as JSON objects, whatever the row format, read and checksum-verified against
        this manifest; ``InvalidArgumentError`` naming the line for one that is not a JSON object."""
        entry = self.splits[split].file
        data = objects.get_bytes(entry.key, expected_sha256=entry.sha256)
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if line.strip():
                where = f"{entry.key} line {number}"
                yield DatasetRecord(where, _loads(line, where))


@dataclass(frozen=True)
class ModelManifest:
    """What a trained model consists of. ``files`` are relative names (``config.json``) → entries."""

    files: dict[str, FileEntry]
    task_type: str
    label_map: list[str]
    # Open Inference Protocol signature: {"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}.
    signature: dict[str, Any]
    lineage: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    base_model: str = ""
    format: str = MODEL_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str = "model manifest") -> ModelManifest:
        raw = _loads(data.decode("utf-8", errors="strict"), where)
        _check_format(raw, MODEL_FORMAT, where)
        try:
            files = {name: FileEntry(**entry) for name, entry in raw["files"].items()}
            manifest = cls(**{**raw, "files": files})
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{where} is malformed: {exc}") from None
        for name, entry in manifest.files.items():
            validate_key(name)
            validate_key(entry.key)
        return manifest

    def download(self, objects: ObjectStore, dest: Path) -> Path:
        """Download every file into ``dest`` (names as in ``files``), each verified; returns ``dest``."""
        for name, entry in sorted(self.files.items()):
            objects.get_file(entry.key, dest / name, expected_sha256=entry.sha256)
        return dest

    def put(self, objects: ObjectStore, prefix: str) -> FileRef:
        """Write this manifest as ``<prefix>/manifest.json`` (replacing one there); what the registry is given."""
        info = objects.put_bytes(
            object_key(prefix, MODEL_MANIFEST), self.to_json(), content_type="application/json", overwrite=True
        )
        return FileRef(info.key, info.sha256, info.size)


def upload_files(
    objects: ObjectStore,
    directory: Path,
    prefix: str,
    *,
    skip: Callable[[Path], bool] = lambda _relative: False,
    content_type: Callable[[Path], str] = lambda _path: "application/octet-stream",
) -> dict[str, FileEntry]:
    """Upload each file under ``directory`` to ``<prefix>/<its relative name>`` (replacing what is there), in name
    order, but those ``skip`` is true of (given the path relative to ``directory``); returns the entries a
    ``ModelManifest`` lists, by relative name."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or skip(relative):
            continue
        name = relative.as_posix()
        info = objects.put_file(object_key(prefix, name), path, content_type=content_type(path), overwrite=True)
        entries[name] = FileEntry(key=info.key, sha256=info.sha256, size_bytes=info.size)
    return entries


def download_files(objects: ObjectStore, files: Mapping[str, FileEntry], dest: Path) -> Path:
    """``dest`` holding every file of ``files`` (relative name → entry), each verified against its sha256.

    Files already there from an earlier download are reused when they all match (hashed again, or remembered from
    an earlier hash in this process while unchanged: ``sha256_file_cached``); otherwise they are downloaded into a
    temporary directory next to ``dest`` that replaces it once complete, so a crash never leaves a half-downloaded
    directory that looks complete. Names are validated like object keys (no ``..``).
    Callers that may download the same ``dest`` from several threads at once serialise them.
    """
    for name in files:
        validate_key(name)
    if dest.is_dir() and all(
        (dest / name).is_file() and sha256_file_cached(dest / name) == entry.sha256 for name, entry in files.items()
    ):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".download-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        for name, entry in sorted(files.items()):
            objects.get_file(entry.key, staging / name, expected_sha256=entry.sha256)
        staging.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def relative_name(key: str, prefix: str) -> str:
    """An object's name inside a stored directory: ``key`` less ``prefix`` (``models/m/3/`` +
    ``config.json``); the last segment of a key outside ``prefix``."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key.rsplit("/", 1)[-1]


def _loads(text: str, where: str) -> Mapping[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where} must be a JSON object")
    return value


def _check_format(raw: Mapping[str, Any], expected: str, where: str) -> None:
    if raw.get("format") != expected:
        raise InvalidArgumentError(f"{where} has format {raw.get('format')!r}; this version reads {expected!r}")


def dataset_manifest_key(project_id: str, dataset_version_id: str) -> str:
    """``datasets/<project>/<dataset version id>/manifest.json`` (validated segments)."""
    return object_key("datasets", project_id, dataset_version_id, "manifest.json")


def dataset_split_key(project_id: str, dataset_version_id: str, split: str) -> str:
    """``datasets/<project>/<dataset version id>/<split>.jsonl`` (validated segments)."""
    return object_key("datasets", project_id, dataset_version_id, f"{split}.jsonl")
