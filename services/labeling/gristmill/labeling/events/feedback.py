"""Feedback becomes data: serving's ``FeedbackRecorded`` events become items of the chat project the model
learned from (and of its preference project); the rules are the domain's (``domain/feedback.py``), this
handler only decodes the event and hands the use case writers on the consumer's transaction.

``GenerationLogged`` is read by the same consumer and stores nothing: a generation nobody gave feedback on is
not a labeling task (yet). Feedback carries its generation in full, so nothing is looked up or joined.

Feedback of a kind this version does not know (a newer producer) is acknowledged and ignored.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.core.chat import ChatMessage, FeedbackKind
from gristmill.core.events import Event, EventCatalog
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.feedback import Feedback, Generation
from gristmill.labeling.domain.model import Project
from gristmill.labeling.domain.ports import ItemWriter
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.store.sql import SqlLabelingStore

log = logging.getLogger(__name__)

_GENERATION_LOGGED = events_pb2.GenerationLogged.DESCRIPTOR.full_name
_KINDS = {
    events_pb2.FEEDBACK_KIND_THUMBS_UP: FeedbackKind.THUMBS_UP,
    events_pb2.FEEDBACK_KIND_THUMBS_DOWN: FeedbackKind.THUMBS_DOWN,
    events_pb2.FEEDBACK_KIND_RATING: FeedbackKind.RATING,
    events_pb2.FEEDBACK_KIND_REGENERATE: FeedbackKind.REGENERATE,
    events_pb2.FEEDBACK_KIND_EDIT: FeedbackKind.EDIT,
    events_pb2.FEEDBACK_KIND_TEXT: FeedbackKind.TEXT,
}


class FeedbackHandler:
    def __init__(self, service: LabelingService, store: SqlLabelingStore, catalog: EventCatalog) -> None:
        self.service = service
        self.store = store
        self.catalog = catalog

    def __call__(self, event: Event, session: Session) -> None:
        if event.event_type == _GENERATION_LOGGED:
            generation = self.catalog.decode(event, events_pb2.GenerationLogged)
            log.debug("generation %s without feedback: nothing to store", generation.request_id)
            return
        message = self.catalog.decode(event, events_pb2.FeedbackRecorded)
        kind = _KINDS.get(message.kind)
        if kind is None:
            log.info("feedback %s of unknown kind %d ignored", message.request_id, message.kind)
            return
        feedback = feedback_of(message, kind)

        def writer_for(project: Project) -> ItemWriter:
            return self.store.writer_in(
                session,
                project.organization_id,
                project.project_id,
                self.service.clock(),
                consensus=ConsensusRule.of(project),
            )

        outcome = self.service.ingest_feedback(feedback, writer_for)
        if outcome.reports:
            log.info(
                "feedback %s on %s (%s v%d): %s",
                kind.value,
                feedback.generation.request_id,
                feedback.generation.model_name,
                feedback.generation.model_version,
                ", ".join(
                    f"{project_id}: {'new item' if report.accepted_count else 'duplicate or empty, not added'}"
                    for project_id, report in outcome.reports.items()
                ),
            )


def feedback_of(message: events_pb2.FeedbackRecorded, kind: FeedbackKind) -> Feedback:
    generation = message.generation
    return Feedback(
        organization_id=message.organization_id or generation.organization_id,
        kind=kind,
        generation=Generation(
            request_id=message.request_id or generation.request_id,
            model_name=generation.registered_model_name,
            model_version=generation.model_version,
            messages=tuple(
                ChatMessage(turn.role, turn.content, turn.tool_calls, turn.tool_call_id, turn.name)
                for turn in generation.messages
            ),
            reply=generation.reply,
            labeling_project_id=generation.labeling_project_id,
        ),
        rating=message.rating,
        edited_reply=message.edited_reply,
        kept_reply=message.kept_reply,
        discarded_reply=message.discarded_reply,
    )
