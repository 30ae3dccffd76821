"""Writing dataset versions and base models to the object store the way the other services do.

For tests, the benchmark and local experiments: labeling publishes dataset versions and the registry
imports base models in production; these helpers write the same formats (``gristmill.core.manifests``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gristmill.core.chat import (
    ASSISTANT,
    ROW_FORMAT_CLASSIFICATION,
    ROW_FORMAT_DPO,
    ROW_FORMAT_SFT,
    SYSTEM,
    USER,
    ChatMessage,
    dpo_row,
)
from gristmill.core.manifests import (
    DatasetManifest,
    DatasetRow,
    FileEntry,
    ModelManifest,
    SplitFile,
    dataset_manifest_key,
    dataset_split_key,
    upload_files,
)
from gristmill.core.storage import ObjectStore
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
    return _write_version(
        objects,
        project_id=project_id,
        dataset_version_id=dataset_version_id,
        label_map=label_map,
        task_type=task_type,
        version_number=version_number,
        row_format=ROW_FORMAT_CLASSIFICATION,
        splits={
            split: (
                [DatasetRow(f"{split}-{i}", text, label).to_json() for i, (text, label) in enumerate(rows)],
                dict(Counter(label for _, label in rows)),
            )
            for split, rows in splits.items()
        },
    )


def write_chat_version(
    objects: ObjectStore,
    *,
    project_id: str,
    dataset_version_id: str,
    splits: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    task_type: str = "TASK_TYPE_CHAT",
    row_format: str = ROW_FORMAT_SFT,
    version_number: int = 1,
) -> DatasetRef:
    """Write a chat version as labeling publishes one: SFT rows ``{"id", "messages"}`` per split (``splits`` maps a
    split name to conversations), counted per stratum rather than per label."""
    return _write_version(
        objects,
        project_id=project_id,
        dataset_version_id=dataset_version_id,
        label_map=("accepted", "rejected"),
        task_type=task_type,
        version_number=version_number,
        row_format=row_format,
        splits={
            split: (
                [
                    json.dumps({"id": f"{split}-{i}", "messages": list(messages)}, separators=(",", ":"))
                    for i, messages in enumerate(conversations)
                ],
                {"source:import": len(conversations)} if conversations else {},
            )
            for split, conversations in splits.items()
        },
    )


def write_preference_version(
    objects: ObjectStore,
    *,
    project_id: str,
    dataset_version_id: str,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    version_number: int = 1,
) -> DatasetRef:
    """Write a preference version as labeling publishes one: DPO rows ``{"id", "prompt", "chosen", "rejected"}`` per
    split (``splits`` maps a split name to rows; a row without an ``id`` gets ``<split>-<n>``). The manifest counts
    items (rows sharing an id are one item's pairs), per stratum rather than per label."""
    written: dict[str, tuple[list[str], dict[str, int]]] = {}
    for split, rows in splits.items():
        full = [{"id": f"{split}-{i}", **row} for i, row in enumerate(rows)]
        items = len({row["id"] for row in full})
        lines = [json.dumps(row, separators=(",", ":")) for row in full]
        written[split] = (lines, {"source:import": items} if items else {})
    return _write_version(
        objects,
        project_id=project_id,
        dataset_version_id=dataset_version_id,
        label_map=(),
        task_type="TASK_TYPE_PREFERENCE",
        version_number=version_number,
        row_format=ROW_FORMAT_DPO,
        splits=written,
    )


def _write_version(
    objects: ObjectStore,
    *,
    project_id: str,
    dataset_version_id: str,
    label_map: Sequence[str],
    task_type: str,
    version_number: int,
    row_format: str,
    splits: Mapping[str, tuple[list[str], dict[str, int]]],
) -> DatasetRef:
    files: dict[str, SplitFile] = {}
    for split, (lines, counts) in splits.items():
        data = ("\n".join(lines) + "\n").encode() if lines else b""
        info = objects.put_bytes(dataset_split_key(project_id, dataset_version_id, split), data, overwrite=True)
        files[split] = SplitFile(
            file=FileEntry(key=info.key, sha256=info.sha256, size_bytes=info.size),
            # Items: one row each, or one row per pair of a preference item (all with the item's id).
            count=len({json.loads(line)["id"] for line in lines}),
            label_counts=counts,
        )
    total = sum(len(lines) for lines, _ in splits.values()) or 1
    manifest = DatasetManifest(
        project_id=project_id,
        dataset_version_id=dataset_version_id,
        version_number=version_number,
        task_type=task_type,
        label_map=list(label_map),
        schema_version=1,
        splits=files,
        seed=0,
        ratios={name: len(lines) / total for name, (lines, _) in splits.items()},
        created_at=datetime.now(UTC).isoformat(),
        row_format=row_format,
    )
    info = objects.put_bytes(dataset_manifest_key(project_id, dataset_version_id), manifest.to_json(), overwrite=True)
    return DatasetRef(project_id, dataset_version_id, FileRef(info.key, info.sha256, info.size))


def chat_rows(count: int, seed: int) -> list[list[dict[str, str]]]:
    """Synthetic conversations a tiny causal LM learns in a few dozen steps: the user asks to repeat two words,
    the assistant repeats them; every third has a system turn, every fourth a second exchange."""
    rng = random.Random(seed)
    words = _POSITIVE + _NEGATIVE
    rows: list[list[dict[str, str]]] = []
    for i in range(count):
        messages: list[dict[str, str]] = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You repeat words."})
        for _ in range(2 if i % 4 == 0 else 1):
            pair = " ".join(rng.sample(words, 2))
            messages += [{"role": "user", "content": f"repeat {pair}"}, {"role": "assistant", "content": pair}]
        rows.append(messages)
    return rows


def preference_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic preference rows (``dpo_row``, without ids) a tiny causal LM learns to rank in a few steps: the user
    asks to repeat two words; the chosen reply repeats them, the rejected one parrots the request instead. Every third
    prompt has a system turn, every fourth an earlier exchange."""
    rng = random.Random(seed)
    words = _POSITIVE + _NEGATIVE
    rows: list[dict[str, Any]] = []
    for i in range(count):
        prompt: list[ChatMessage] = []
        if i % 3 == 0:
            prompt.append(ChatMessage(SYSTEM, "You repeat words."))
        if i % 4 == 0:
            earlier = " ".join(rng.sample(words, 2))
            prompt += [ChatMessage(USER, f"repeat {earlier}"), ChatMessage(ASSISTANT, earlier)]
        request = f"repeat {' '.join(rng.sample(words, 2))}"
        prompt.append(ChatMessage(USER, request))
        row = dpo_row("", prompt, request.removeprefix("repeat "), request)
        del row["id"]
        rows.append(row)
    return rows


def chat_vocabulary_text() -> str:
    """Every string ``chat_rows`` renders (to train a tokenizer on)."""
    return " ".join(("You repeat words.", "repeat", "system", "user", "assistant", *_POSITIVE, *_NEGATIVE))


def upload_model_directory(objects: ObjectStore, directory: Path, prefix: str) -> FileRef:
    """Upload a Hugging Face directory under ``prefix`` with a ``manifest.json`` (a base model in the store)."""
    entries = upload_files(
        objects, Path(directory), prefix, skip=lambda relative: any(part.startswith(".") for part in relative.parts)
    )
    manifest = ModelManifest(files=entries, task_type="TASK_TYPE_UNSPECIFIED", label_map=[], signature={}, lineage={})
    return manifest.put(objects, prefix)
