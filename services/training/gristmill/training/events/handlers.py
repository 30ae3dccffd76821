"""Event handlers: a published dataset version starts the project's auto-train job."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.events import Event, EventCatalog, Handler
from gristmill.training.domain.jobs import JobService, PublishedVersion
from gristmill.training.domain.refs import FileRef

log = logging.getLogger(__name__)


def dataset_version_published(jobs: JobService, catalog: EventCatalog) -> Handler:
    """Handler for ``DatasetVersionPublished``. Submitting is idempotent per event id (the job's request id),
    so a redelivered event does not start a second job."""

    def handle(event: Event, session: Session) -> None:
        message = catalog.decode(event, events_pb2.DatasetVersionPublished)
        manifest = None
        if message.HasField("manifest") and message.manifest.key:
            m = message.manifest
            manifest = FileRef(key=m.key, sha256=m.sha256, size_bytes=m.size_bytes)
        version = PublishedVersion(
            event_id=event.event_id,
            organization_id=message.organization_id,
            project_id=message.project_id,
            dataset_version_id=message.dataset_version_id,
            manifest=manifest,
        )
        log.info(
            "dataset version %s/%s published (event %s): checking the project's auto-train policy",
            version.project_id,
            version.dataset_version_id,
            event.event_id,
        )
        try:
            job = jobs.on_dataset_published(version)
        except (InvalidArgumentError, NotFoundError, FailedPreconditionError) as exc:
            # The policy does not fit this version (or the version is unusable): nothing to retry, so the
            # event is handled, and the reason is logged for the project's owner.
            log.warning(
                "auto-train for %s/%s not started: %s", version.project_id, version.dataset_version_id, exc.message
            )
            return
        if job is None:
            log.info("no enabled auto-train policy for project %s: nothing to train", version.project_id)
        else:
            log.info(
                "auto-train job %s submitted for %s/%s", job.job_id, version.project_id, version.dataset_version_id
            )

    return handle
