"""The ``alias changed`` consumer: deployments that follow the alias load the new version, then swap.

The handler runs on the consumer's thread inside the transaction that marks the event handled (by this
replica's consumer group: a redelivery is skipped before it gets here). It records the event's sequence per
(model, alias) in that transaction, ignores an event whose sequence is older than the last one applied (an
old event arriving late; the same sequence applies again, as replicas sharing the store each apply every
event), and hands the move to the event loop, which loads and swaps in the background: a load takes seconds
and must not hold the consumer's database transaction open. If the process dies before the swap, the restart
resolves the alias again.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.events import Event, EventCatalog, Handler
from gristmill.serving.domain.model import organization_or_default
from gristmill.serving.domain.ports import DeploymentStore
from gristmill.serving.domain.service import DeploymentService

log = logging.getLogger(__name__)


def alias_changed_handler(catalog: EventCatalog, store: DeploymentStore, service: DeploymentService) -> Handler:
    def handle(event: Event, session: Session) -> None:
        message = catalog.decode(event, events_pb2.AliasChanged)
        if not message.registered_model_name or not message.alias:
            raise InvalidArgumentError(f"alias-changed event {event.event_id} has no registered_model_name or alias")
        org = organization_or_default(message.organization_id)
        model, alias = message.registered_model_name, message.alias
        if message.sequence > 0 and not store.apply_alias_sequence(session, org, model, alias, message.sequence):
            log.info("ignoring stale alias change %s/%s (sequence %d)", model, alias, message.sequence)
            return
        to_version = message.to_version if message.HasField("to_version") else None
        log.info("alias %s of %s moved to %s (sequence %d)", alias, model, to_version, message.sequence)
        service.alias_changed_threadsafe(org, model, alias, to_version)

    return handle
