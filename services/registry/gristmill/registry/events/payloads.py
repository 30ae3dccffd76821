"""Domain → event payloads, written into the outbox of the caller's transaction."""

from __future__ import annotations

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import EventCatalog, OutboxWriter
from gristmill.registry.api import convert
from gristmill.registry.domain.model import AliasChange, ModelVersion


def version_registered_payload(version: ModelVersion) -> events_pb2.ModelVersionRegistered:
    return events_pb2.ModelVersionRegistered(
        registered_model_name=version.model_name,
        organization_id=version.organization_id,
        version=version.version,
        status=convert.status_to_proto(version.status),
        status_reason=version.status_reason,
        metrics=[convert.metric_to_proto(m) for m in version.metrics],
        training_job_id=version.lineage.training_job_id,
        dataset_version=convert.dataset_ref_to_proto(version.lineage),
    )


def alias_changed_payload(change: AliasChange) -> events_pb2.AliasChanged:
    out = events_pb2.AliasChanged(
        registered_model_name=change.model_name,
        organization_id=change.organization_id,
        alias=change.alias,
        reason=change.reason,
        actor=change.actor,
        cause=convert.cause_to_proto(change.cause),
        sequence=change.sequence,
    )
    if change.from_version is not None:
        out.from_version = change.from_version
    if change.to_version is not None:
        out.to_version = change.to_version
    return out


class OutboxEventWriter:
    """The store's ``EventWriter`` on the platform's ``OutboxWriter``: events keyed by model name, in the
    caller's transaction and the current trace context."""

    def __init__(self, catalog: EventCatalog, source: str) -> None:
        self.outbox = OutboxWriter(catalog, source)

    def version_registered(self, session: Session, version: ModelVersion) -> None:
        self.outbox.write(session, version_registered_payload(version), key=version.model_name)

    def alias_changed(self, session: Session, change: AliasChange) -> None:
        self.outbox.write(session, alias_changed_payload(change), key=change.model_name)
