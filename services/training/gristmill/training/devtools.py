"""Writing dataset versions and base models to the object store the way the other services do.

For tests, the benchmark and local experiments: labeling publishes dataset versions and the registry
imports base models in production; these helpers write the same formats (``gristmill.core.manifests``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from gristmill.core.manifests import (
    DatasetManifest,
    DatasetRow,
    FileEntry,
    ModelManifest,
    SplitFile,
    dataset_manifest_key,
    dataset_split_key,
)
from gristmill.core.storage import ObjectStore, object_key
from gristmill.training.domain.refs import DatasetRef, FileRef

LABELS = ("negative", "positive")
_POSITIVE = ("good", "great", "lovely", "excellent", "nice", "fine", "happy", "superb")
_NEGATIVE = ("bad", "awful", "terrible", "poor", "sad", "broken", "boring", "ugly")
_NEUTRAL = ("the", "movie", "phone", "food", "was", "service", "really", "quite", "and", "place")


def sentiment_rows(count: int, seed: int) -> list[tuple[str, str]]:
    """Synthetic (text, label) pairs whose label is decided by their sentiment words, alternating labels:
    a tiny model learns them in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = LABELS[i % 2]
        words = rng.sample(_NEUTRAL, 3) + rng.sample(_POSITIVE if label == "positive" else _NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def vocabulary_text() -> str:
    """Every word ``sentiment_rows`` uses (to build a tokenizer vocabulary from)."""
    return " ".join(_POSITIVE + _NEGATIVE + _NEUTRAL)


def write_dataset_version(
    objects: ObjectStore,
    *,
    project_id: str,
    dataset_version_id: str,
    label_map: Sequence[str],
    splits: Mapping[str, Sequence[tuple[str, str]]],
    task_type: str = "TASK_TYPE_TEXT_CLASSIFICATION",
    version_number: int = 1,
) -> DatasetRef:
    """Write ``datasets/<project>/<version>/{split}.jsonl`` and ``manifest.json``; ``splits`` maps a split
    name to (text, label) pairs."""
    files: dict[str, SplitFile] = {}
    for split, rows in splits.items():
        lines = [
            DatasetRow(id=f"{split}-{i}", text=text, label=label).to_json() for i, (text, label) in enumerate(rows)
        ]
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        info = objects.put_bytes(dataset_split_key(project_id, dataset_version_id, split), data, overwrite=True)
        files[split] = SplitFile(
            file=FileEntry(key=info.key, sha256=info.sha256, size_bytes=info.size),
            count=len(rows),
            label_counts=dict(Counter(label for _, label in rows)),
        )
    total = sum(len(rows) for rows in splits.values()) or 1
    manifest = DatasetManifest(
        project_id=project_id,
        dataset_version_id=dataset_version_id,
        version_number=version_number,
        task_type=task_type,
        label_map=list(label_map),
        schema_version=1,
        splits=files,
        seed=0,
        ratios={name: len(rows) / total for name, rows in splits.items()},
        created_at=datetime.now(UTC).isoformat(),
    )
    info = objects.put_bytes(dataset_manifest_key(project_id, dataset_version_id), manifest.to_json(), overwrite=True)
    return DatasetRef(project_id, dataset_version_id, FileRef(info.key, info.sha256, info.size))


def upload_model_directory(objects: ObjectStore, directory: Path, prefix: str) -> FileRef:
    """Upload a Hugging Face directory under ``prefix`` with a ``manifest.json`` (a base model in the store)."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        info = objects.put_file(object_key(prefix, relative.as_posix()), path, overwrite=True)
        entries[relative.as_posix()] = FileEntry(key=info.key, sha256=info.sha256, size_bytes=info.size)
    manifest = ModelManifest(files=entries, task_type="TASK_TYPE_UNSPECIFIED", label_map=[], signature={}, lineage={})
    info = objects.put_bytes(object_key(prefix, "manifest.json"), manifest.to_json(), overwrite=True)
    return FileRef(info.key, info.sha256, info.size)
