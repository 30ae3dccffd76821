"""Builders shared by the registry's tests: a registry over SQLite + local-disk objects, uploaded artifacts."""

from __future__ import annotations

import hashlib
import itertools
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import select

from gristmill.core.events import Event, EventCatalog
from gristmill.core.events.outbox import OutboxEvent
from gristmill.core.events.topics import platform_catalog
from gristmill.core.manifests import FileEntry, ModelManifest
from gristmill.core.sql import Database
from gristmill.core.storage import LocalObjectStore, ObjectStore
from gristmill.core.values import FileRef, Signature, TensorSpec
from gristmill.registry.domain.model import Caller, Lineage, Metric, VersionDraft
from gristmill.registry.domain.registration import Registration
from gristmill.registry.domain.services import RegistryServices
from gristmill.registry.events.payloads import OutboxEventWriter
from gristmill.registry.store.sql import SqlRegistryStore
from tests.support.databases import migrated_database

SIGNATURE = {
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
}
DOMAIN_SIGNATURE = Signature(
    inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("probabilities", "FP32", (-1, 2)),)
)
CALLER = Caller(actor="alice")


class TickingClock:
    """A clock that moves 1 ms per reading, so every recorded time is distinct and ordered."""

    def __init__(self) -> None:
        self._start = datetime(2026, 1, 1, tzinfo=UTC)
        self._ticks = itertools.count()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._start + timedelta(milliseconds=next(self._ticks))


@dataclass
class Env:
    registry: RegistryServices
    store: SqlRegistryStore
    objects: LocalObjectStore
    database: Database
    catalog: EventCatalog

    def events(self, message_type: type[Message]) -> list[tuple[Event, Any]]:
        """The events of ``message_type`` written to the outbox, oldest first, decoded."""
        topic = self.catalog.topic_for(message_type)
        with self.database.transaction() as session:
            rows = session.execute(select(OutboxEvent).where(OutboxEvent.topic == topic).order_by(OutboxEvent.id))
            events = [row.to_event() for row in rows.scalars()]
        return [(e, self.catalog.decode(e, message_type)) for e in events]


def make_env(tmp_path: Path, *, allow_local_paths: bool = True, database_url: str | None = None) -> Env:
    database = migrated_database(database_url or f"sqlite:///{tmp_path / 'registry.db'}", "registry")
    objects = LocalObjectStore(tmp_path / "objects")
    catalog = platform_catalog()
    store = SqlRegistryStore(database, OutboxEventWriter(catalog, "registry"))
    registry = RegistryServices.create(store, objects, clock=TickingClock(), allow_local_paths=allow_local_paths)
    return Env(registry, store, objects, database, catalog)


def upload_model(
    objects: ObjectStore,
    prefix: str,
    *,
    files: dict[str, bytes] | None = None,
    metrics: dict[str, float] | None = None,
    labels: tuple[str, ...] = ("negative", "positive"),
    signature: dict[str, Any] | None = None,
) -> FileRef:
    """Upload artifacts and their manifest under ``prefix`` (as training does); returns the manifest's ref."""
    files = files if files is not None else {"model.safetensors": b"weights-" + prefix.encode(), "config.json": b"{}"}
    entries = {}
    for name, data in files.items():
        info = objects.put_bytes(f"{prefix}/{name}", data, overwrite=True)
        entries[name] = FileEntry(info.key, info.sha256, info.size)
    manifest = ModelManifest(
        files=entries,
        task_type="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=list(labels),
        signature=SIGNATURE if signature is None else signature,
        lineage={"training_job_id": prefix},
        metrics=metrics or {},
    )
    return manifest.put(objects, prefix)


def draft(
    manifest: FileRef,
    prefix: str,
    *,
    job_id: str = "",
    metrics: tuple[Metric, ...] = (),
    signature: Signature | None = DOMAIN_SIGNATURE,
    tags: dict[str, str] | None = None,
) -> VersionDraft:
    return VersionDraft(
        source_prefix=prefix,
        source_manifest=manifest,
        signature=signature,
        task="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=("negative", "positive"),
        metrics=metrics,
        lineage=Lineage(training_job_id=job_id, project_id="reviews", dataset_version_id="dv1"),
        description="",
        tags=tags or {},
    )


def register_ready(env: Env, model: str, *, accuracy: float | None = None, job_id: str = "") -> int:
    """Upload artifacts and register a READY version; returns its number."""
    prefix = f"jobs/{uuid.uuid4().hex[:10]}"
    metrics = (Metric("accuracy", accuracy, "test"),) if accuracy is not None else ()
    manifest = upload_model(env.objects, prefix)
    version, _ = env.registry.registrations.register_version(
        CALLER, Registration(model, True, draft(manifest, prefix, job_id=job_id, metrics=metrics)), wait=True
    )
    assert version.status.value == "READY", version.status_reason
    return version.version


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
