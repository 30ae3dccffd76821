"""The usage aggregator: ``usage recorded`` events → hourly totals.

It consumes a fetched batch at a time (a ``BatchHandler``): the consumer has already dropped the events this
group handled (by ``event-id``) and gives the handler the session of the one transaction that marks them all
handled, so each event is counted exactly once, and a batch costs one store write per (organisation, key,
kind, hour) instead of one per event. An event carries one or more kinds (``kind`` and ``more``), each counted.
An event that cannot be counted (unknown kind, a kind named twice, non-positive quantity, bad ids, an
undecodable payload) fails the batch; the consumer then handles the batch event by event, so that event alone
goes to the dead-letter topic, none of its kinds counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from gristmill.admin.domain.metering import InvalidUsageError, Metering, UsageEvent
from gristmill.api.events.v1 import events_pb2
from gristmill.core.events import BatchHandler, Event, EventCatalog


def usage_recorded_handler(metering: Metering, catalog: EventCatalog) -> BatchHandler:
    def handle(events: Sequence[Event], session: Session) -> None:
        metering.record_many(session, [usage for event in events for usage in _usage_of(catalog, event)])

    return BatchHandler(handle)


def _usage_of(catalog: EventCatalog, event: Event) -> list[UsageEvent]:
    """The event's usage, one per kind: ``kind`` and ``quantity``, then each of ``more``."""
    message = catalog.decode(event, events_pb2.UsageRecorded)
    amounts = [(message.kind, message.quantity), *((amount.kind, amount.quantity) for amount in message.more)]
    kinds = [kind for kind, _ in amounts]
    if len(set(kinds)) < len(kinds):
        raise InvalidUsageError(f"usage event names a kind more than once ({kinds})")
    return [
        UsageEvent(
            organization_id=message.organization_id,
            api_key_id=message.api_key_id,
            kind=kind,
            quantity=quantity,
            at=event.event_time,
        )
        for kind, quantity in amounts
    ]
