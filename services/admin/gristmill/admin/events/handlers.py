"""The usage aggregator: ``usage recorded`` events → hourly totals.

The consumer has already skipped events this group handled (by ``event-id``) and gives the handler the
session of the transaction that marks the event handled, so an event is counted exactly once. An event
that cannot be counted (unknown kind, non-positive quantity, bad ids) raises and goes to the dead-letter
topic.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from gristmill.admin.domain.metering import Metering
from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import Event, EventCatalog, Handler


def usage_recorded_handler(metering: Metering, catalog: EventCatalog) -> Handler:
    def handle(event: Event, session: Session) -> None:
        message = catalog.decode(event, events_pb2.UsageRecorded)
        metering.record(
            session,
            organization_id=message.organization_id,
            api_key_id=message.api_key_id,
            kind=message.kind,
            quantity=message.quantity,
            at=event.event_time,
        )

    return handle
