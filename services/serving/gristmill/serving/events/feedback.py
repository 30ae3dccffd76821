"""``feedback recorded`` events: a user's feedback with its generation in full, PII-masked here (every turn, the
reply and the feedback's own texts) before anything leaves the process, written to the outbox in one transaction
(the relay publishes it; labeling consumes it)."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from gristmill.api.events.v1 import events_pb2
from gristmill.core.chat import FeedbackKind
from gristmill.core.events import EventCatalog, Outbox, OutboxWriter
from gristmill.core.pii import PiiMasker
from gristmill.core.sql import Database
from gristmill.serving.domain.feedback import FeedbackInput, GenerationRecord
from gristmill.serving.domain.outcomes import OutcomeKey, Outcomes

_KINDS = {
    FeedbackKind.THUMBS_UP: events_pb2.FEEDBACK_KIND_THUMBS_UP,
    FeedbackKind.THUMBS_DOWN: events_pb2.FEEDBACK_KIND_THUMBS_DOWN,
    FeedbackKind.RATING: events_pb2.FEEDBACK_KIND_RATING,
    FeedbackKind.REGENERATE: events_pb2.FEEDBACK_KIND_REGENERATE,
    FeedbackKind.EDIT: events_pb2.FEEDBACK_KIND_EDIT,
    FeedbackKind.TEXT: events_pb2.FEEDBACK_KIND_TEXT,
}


def generation_logged(record: GenerationRecord, masker: PiiMasker) -> events_pb2.GenerationLogged:
    def mask(text: str) -> str:
        return masker.mask(text)[0]

    return events_pb2.GenerationLogged(
        organization_id=record.organization_id,
        request_id=record.request_id,
        registered_model_name=record.registered_model_name,
        model_version=record.version,
        deployment_name=record.deployment,
        messages=[
            events_pb2.ChatTurn(
                role=m.role, content=mask(m.content), tool_calls=m.tool_calls, tool_call_id=m.tool_call_id, name=m.name
            )
            for m in record.messages
        ],
        reply=mask(record.reply),
        sampling_parameters=dict(record.sampling),
        labeling_project_id=record.labeling_project_id,
    )


def feedback_recorded(
    organization_id: str, record: GenerationRecord, feedback: FeedbackInput, masker: PiiMasker
) -> events_pb2.FeedbackRecorded:
    def mask(text: str) -> str:
        return masker.mask(text)[0]

    return events_pb2.FeedbackRecorded(
        organization_id=organization_id,
        request_id=record.request_id,
        kind=_KINDS[feedback.kind],
        rating=feedback.rating,
        edited_reply=mask(feedback.edited_reply),
        kept_reply=mask(feedback.kept_reply),
        discarded_reply=mask(feedback.discarded_reply),
        text=mask(feedback.text),
        generation=generation_logged(record, masker),
    )


class OutboxFeedbackPublisher:
    """The ``FeedbackPublisher`` of the service: one outbox transaction per feedback."""

    def __init__(
        self, database: Database, catalog: EventCatalog, *, source: str = "serving", masker: PiiMasker | None = None
    ) -> None:
        self._database = database
        self._events = OutboxWriter(catalog, source)
        self._masker = masker or PiiMasker()

    def publish(self, organization_id: str, record: GenerationRecord, feedback: FeedbackInput) -> None:
        self._write(feedback_recorded(organization_id, record, feedback, self._masker), record)

    def log_generation(self, record: GenerationRecord) -> None:
        self._write(generation_logged(record, self._masker), record)

    def publish_outcomes(self, counts: Mapping[OutcomeKey, Outcomes]) -> None:
        events = [
            self._events.event(
                events_pb2.GenerationOutcomes(
                    organization_id=key.organization_id,
                    registered_model_name=key.registered_model_name,
                    model_version=key.version,
                    deployment_name=key.deployment,
                    succeeded=outcomes.succeeded,
                    failed=outcomes.failed,
                ),
                key=key.registered_model_name,
            )
            for key, outcomes in counts.items()
        ]
        with self._database.transaction() as session:
            Outbox.add_many(session, events)

    def _write(self, message: Message, record: GenerationRecord) -> None:
        event = self._events.event(message, key=record.registered_model_name)
        with self._database.transaction() as session:
            Outbox.add_many(session, [event])
