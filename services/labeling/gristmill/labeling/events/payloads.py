"""Domain → event payload mapping for the events labeling produces."""

from __future__ import annotations

from sqlalchemy.orm import Session

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import EventCatalog, OutboxWriter
from gristmill.labeling.domain.model import DatasetVersion, Split

SOURCE = "labeling"

_SPLITS = {
    Split.TRAIN: common_pb2.DATASET_SPLIT_TRAIN,
    Split.VALIDATION: common_pb2.DATASET_SPLIT_VALIDATION,
    Split.TEST: common_pb2.DATASET_SPLIT_TEST,
}


def dataset_version_published(version: DatasetVersion) -> events_pb2.DatasetVersionPublished:
    return events_pb2.DatasetVersionPublished(
        project_id=version.project_id,
        organization_id=version.organization_id,
        dataset_version_id=version.dataset_version_id,
        version_number=version.version_number,
        task_type=common_pb2.TaskType.Value(version.task_type.value),
        label_map=common_pb2.LabelMap(labels=list(version.label_map)),
        schema_version=version.schema_version,
        manifest=_ref(version.manifest.key, version.manifest.sha256, version.manifest.size_bytes),
        splits=[
            events_pb2.PublishedSplit(
                split=_SPLITS[s.split], item_count=s.item_count, file=_ref(s.file.key, s.file.sha256, s.file.size_bytes)
            )
            for s in version.splits
        ],
    )


def _ref(key: str, sha256: str, size: int) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=key, sha256=sha256, size_bytes=size)


class LabelingEvents:
    """The store's ``DatasetEvents`` on the platform's ``OutboxWriter``: a new dataset version's event keyed by
    project (so a project's versions stay ordered), in the publishing transaction and its trace context."""

    def __init__(self, catalog: EventCatalog, source: str = SOURCE) -> None:
        self.outbox = OutboxWriter(catalog, source)

    def dataset_version_published(self, session: Session, version: DatasetVersion) -> None:
        self.outbox.write(session, dataset_version_published(version), key=version.project_id)
