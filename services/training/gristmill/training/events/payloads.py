"""Domain -> event payloads: the ``JobStateChanged`` record every state change and progress update emits."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth_quota import UsageRecord, UsageRecorder
from gristmill.core.events import EventCatalog, OutboxWriter
from gristmill.core.sql import Database
from gristmill.training.api import convert
from gristmill.training.domain.model import Job, JobState
from gristmill.training.domain.objectives import model_task_type


def job_state_changed(job: Job, previous: JobState | None) -> events_pb2.JobStateChanged:
    """The event for ``job`` now in its state, coming from ``previous`` (None for the first, QUEUED, event).

    A repeated state (RUNNING -> RUNNING) is a progress update. SUCCEEDED carries everything the registry
    needs to register the model: artifacts, manifest, signature, label map, metrics and lineage.
    """
    msg = events_pb2.JobStateChanged(
        job_id=job.job_id,
        organization_id=job.organization_id,
        state=convert.state_to_proto(job.state),
        previous_state=convert.state_to_proto(previous),
        reason=job.state_reason,
        metrics=[convert.metric_to_proto(m) for m in job.latest_metrics],
        progress=convert.progress_to_proto(job.progress),
        # The trained model's task type (a DPO job on a preference version trains a chat model).
        task=convert.task_to_proto(model_task_type(job.spec.task)),
        tags=job.spec.tags,
    )
    result = job.result
    if job.state is JobState.SUCCEEDED and result is not None:
        msg.registered_model_name = job.spec.registered_model_name
        msg.artifact_prefix = result.artifact_prefix
        msg.manifest.CopyFrom(convert.file_ref_to_proto(result.manifest))
        msg.artifacts.extend(convert.file_ref_to_proto(f) for f in result.files)
        msg.signature.CopyFrom(convert.signature_to_proto(result.signature))
        msg.label_map.CopyFrom(convert.label_map_to_proto(result.label_map))
        msg.lineage.CopyFrom(convert.lineage_to_proto(result.lineage))
        # Final metrics (test split included) rather than the last progress report's.
        del msg.metrics[:]
        msg.metrics.extend(convert.metric_to_proto(m) for m in result.metrics)
    return msg


class TrainingEvents:
    """The job store's ``JobEvents`` on the platform's ``OutboxWriter``: state changes keyed by job (so a job's
    events stay ordered) and usage, in the caller's transaction and trace context."""

    def __init__(self, database: Database, catalog: EventCatalog, source: str) -> None:
        self.outbox = OutboxWriter(catalog, source)
        self.usage = UsageRecorder(database, catalog, source)

    def job_state_changed(self, session: Session, job: Job, previous: JobState | None) -> None:
        self.outbox.write(session, job_state_changed(job, previous), key=job.job_id)

    def usage_recorded(self, session: Session, records: Sequence[UsageRecord]) -> None:
        self.usage.add(session, records)
