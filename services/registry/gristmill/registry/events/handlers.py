"""The registry's consumers.

- ``JobStateChanged`` (training): a SUCCEEDED job naming a registered model becomes a version, verified
  and copied like an RPC registration. Idempotent by ``lineage.training_job_id`` (falling back to the
  event's ``job_id``): a redelivered or duplicated event finds the version and creates nothing.
- ``ModelVersionRegistered`` (the registry's own): a READY version is put to the model's promotion policy.
- ``FeedbackRecorded`` (serving): counted for the promotion policy's online gate, which may promote or roll back
  the canary. A redelivered event is skipped by the consumer; the same generation's later feedback replaces its
  earlier verdict, so each generation counts once.
- ``GenerationOutcomes`` (serving): replies per version, succeeded and failed, for the online gate's error rates.

Each handler writes through the consumer's session, so its state change, its events and the
handled-event record commit together. The PENDING version row of a registration commits first, in its
own transaction: the copy runs outside any transaction, and a crash after it is finished by the
redelivery; an object-store outage leaves it PENDING for the registry's retry loop (``__main__``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.api.training.v1 import training_pb2
from gristmill.core.errors import UnavailableError
from gristmill.core.events import Event, EventCatalog, Handler
from gristmill.core.ids import validate_id
from gristmill.core.values import DEFAULT_ORGANIZATION
from gristmill.registry.api import convert
from gristmill.registry.domain.model import Caller, VersionDraft, VersionStatus
from gristmill.registry.domain.promotion import Promotions, Verdict
from gristmill.registry.domain.registration import Registration, Registrations
from gristmill.registry.store.sql import SqlRegistryStore

log = logging.getLogger(__name__)


def _organization(value: str) -> str:
    return validate_id(value, what="organization_id") if value else DEFAULT_ORGANIZATION


def registration_from_job(msg: events_pb2.JobStateChanged) -> Registration:
    lineage = convert.lineage_from_proto(msg.lineage)
    if not lineage.training_job_id:
        # The job id is the idempotency key; the event always carries it.
        lineage = replace(lineage, training_job_id=msg.job_id)
    return Registration(
        model_name=msg.registered_model_name,
        create_model_if_missing=True,
        draft=VersionDraft(
            source_prefix=msg.artifact_prefix,
            source_manifest=convert.file_from_proto(msg.manifest),
            signature=convert.signature_from_proto(msg.signature),
            task=convert.task_from_proto(msg.task),
            label_map=tuple(msg.label_map.labels),
            metrics=tuple(convert.metric_from_proto(m) for m in msg.metrics),
            lineage=lineage,
            description="",
            tags=dict(msg.tags),
        ),
    )


def job_state_changed_handler(registrations: Registrations, store: SqlRegistryStore, catalog: EventCatalog) -> Handler:
    def handle(event: Event, session: Session) -> None:
        msg = catalog.decode(event, events_pb2.JobStateChanged)
        if msg.state != training_pb2.JOB_STATE_SUCCEEDED or not msg.registered_model_name:
            return
        caller = Caller(actor=event.source, organization_id=_organization(msg.organization_id))
        version, needs_verification = registrations.begin_registration(caller, registration_from_job(msg))
        if not needs_verification:
            log.info(
                "job %s is already registered as %s v%d (%s); nothing to do",
                msg.job_id,
                version.model_name,
                version.version,
                version.status.value,
            )
            return
        try:
            outcome = registrations.verify(version)
        except UnavailableError as exc:
            # Not the event's fault: dead-lettering it would lose nothing but help no one. The version stays
            # PENDING and the registry's retry loop finishes it (emitting its event) once storage is back.
            log.warning("job %s: %s v%d left PENDING (%s)", msg.job_id, version.model_name, version.version, exc)
            return
        done = registrations.finish_registration(store.bind(session), version, outcome)
        log.info("job %s registered as %s v%d: %s", msg.job_id, done.model_name, done.version, done.status.value)

    return handle


def version_registered_handler(promotions: Promotions, store: SqlRegistryStore, catalog: EventCatalog) -> Handler:
    def handle(event: Event, session: Session) -> None:
        msg = catalog.decode(event, events_pb2.ModelVersionRegistered)
        if convert.status_from_proto(msg.status) is not VersionStatus.READY:
            return
        promotions.evaluate_policy(
            store.bind(session), _organization(msg.organization_id), msg.registered_model_name, msg.version
        )

    return handle


# What a kind of feedback says about the reply it is on: None counts for neither side. A regenerate or an edit
# means the reply was not good enough as it was.
_VERDICTS: dict[int, bool | None] = {
    events_pb2.FEEDBACK_KIND_THUMBS_UP: True,
    events_pb2.FEEDBACK_KIND_THUMBS_DOWN: False,
    events_pb2.FEEDBACK_KIND_REGENERATE: False,
    events_pb2.FEEDBACK_KIND_EDIT: False,
    events_pb2.FEEDBACK_KIND_TEXT: None,
}
POSITIVE_RATING = 4
NEGATIVE_RATING = 2


def verdict_of(msg: events_pb2.FeedbackRecorded) -> Verdict | None:
    """The online gate's reading of one feedback event; None when it says nothing about the reply."""
    generation = msg.generation
    if not generation.request_id or not generation.registered_model_name or generation.model_version <= 0:
        return None
    if msg.kind == events_pb2.FEEDBACK_KIND_RATING:
        positive = True if msg.rating >= POSITIVE_RATING else False if msg.rating <= NEGATIVE_RATING else None
    else:
        positive = _VERDICTS.get(msg.kind)
    if positive is None:
        return None
    return Verdict(request_id=generation.request_id, version=generation.model_version, positive=positive)


_GENERATION_OUTCOMES = events_pb2.GenerationOutcomes.DESCRIPTOR.full_name


def feedback_handler(promotions: Promotions, store: SqlRegistryStore, catalog: EventCatalog) -> Handler:
    """The online gate's consumer: feedback verdicts and reply outcomes (two topics, one group)."""

    def handle(event: Event, session: Session) -> None:
        if event.event_type == _GENERATION_OUTCOMES:
            outcomes = catalog.decode(event, events_pb2.GenerationOutcomes)
            if outcomes.model_version <= 0 or not outcomes.registered_model_name:
                return
            promotions.record_outcomes(
                store.bind(session),
                _organization(outcomes.organization_id),
                outcomes.registered_model_name,
                version=outcomes.model_version,
                succeeded=max(0, outcomes.succeeded),
                failed=max(0, outcomes.failed),
            )
            return
        msg = catalog.decode(event, events_pb2.FeedbackRecorded)
        verdict = verdict_of(msg)
        if verdict is None:
            return
        promotions.record_feedback(
            store.bind(session),
            _organization(msg.organization_id or msg.generation.organization_id),
            msg.generation.registered_model_name,
            verdict,
        )

    return handle
