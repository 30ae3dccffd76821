"""What a finished training job leaves in the object store, for tests that register a model without training one:
the model directory's files under a prefix and a manifest listing them (``gristmill.core.manifests``, as training's
publish writes them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from gristmill.api.common.v1 import common_pb2
from gristmill.core.manifests import ModelManifest, upload_files
from gristmill.core.storage import ObjectStore


def upload_job_output(
    objects: ObjectStore,
    model_dir: Path,
    prefix: str,
    *,
    task_type: str = "TASK_TYPE_TEXT_CLASSIFICATION",
    label_map: Sequence[str] = ("negative", "positive"),
    metrics: Mapping[str, float] | None = None,
    base_model: str = "",
) -> common_pb2.ObjectRef:
    """Upload ``model_dir`` under ``prefix`` with its manifest (the job id in the lineage is the prefix's last
    segment); the manifest's ref, as a ``RegisterModelVersion`` request names it."""
    manifest = ModelManifest(
        files=upload_files(objects, model_dir, prefix),
        task_type=task_type,
        label_map=list(label_map),
        signature={},
        lineage={"training_job_id": prefix.rsplit("/", 1)[-1]},
        metrics=dict(metrics or {}),
        base_model=base_model,
    )
    ref = manifest.put(objects, prefix)
    return common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)
