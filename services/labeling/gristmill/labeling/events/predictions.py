"""Active learning: uncertain production inputs (``PredictionLogged``) become items of their project.

Only events flagged ``uncertain`` and naming a labeling project whose settings enable
``import_uncertain_predictions`` create items; the text is cleaned, masked and deduplicated like an
import, and the model's prediction is attached to the new item. Everything else is acknowledged and
ignored (an unknown project is not an error: it may live in another installation).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from gristmill.api.events.v1 import events_pb2
from gristmill.core.errors import InvalidArgumentError, NotFoundError
from gristmill.core.events import Event, EventCatalog
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.model import Prediction
from gristmill.labeling.domain.service import LabelingService, organization
from gristmill.labeling.store.sql import SqlLabelingStore

log = logging.getLogger(__name__)

MAX_EXTERNAL_ID = 256


class PredictionLogHandler:
    def __init__(self, service: LabelingService, store: SqlLabelingStore, catalog: EventCatalog) -> None:
        self.service = service
        self.store = store
        self.catalog = catalog

    def __call__(self, event: Event, session: Session) -> None:
        message = self.catalog.decode(event, events_pb2.PredictionLogged)
        if not message.uncertain or not message.labeling_project_id:
            return
        org = organization(message.organization_id)
        try:
            project = self.store.get_project(org, message.labeling_project_id)
        except (NotFoundError, InvalidArgumentError):
            log.info("prediction for unknown labeling project %r ignored", message.labeling_project_id)
            return
        if not project.settings.active_learning.import_uncertain_predictions:
            return
        external_id = (
            f"prediction:{message.registered_model_name}:{message.model_version}:"
            f"{message.request_id}:{message.index_in_request}"
        )[:MAX_EXTERNAL_ID]
        labels = tuple(message.predicted_labels) or ((message.predicted_label,) if message.predicted_label else ())
        names = set(project.label_schema.names)
        probabilities = dict(message.probabilities)
        prediction = None
        # A prediction in the model's own label names that the schema lacks is not attached (the item still is).
        if message.registered_model_name and set(labels) <= names and set(probabilities) <= names:
            prediction = Prediction(
                model_name=message.registered_model_name,
                model_version=message.model_version,
                labels=labels,
                probabilities=probabilities,
                create_time=event.event_time,
            )
        writer = self.store.writer_in(
            session, org, project.project_id, self.service.clock(), consensus=ConsensusRule.of(project)
        )
        report = self.service.ingest_prediction(
            writer, project, external_id=external_id, text=message.masked_text, prediction=prediction
        )
        log.info(
            "prediction %s of %s v%d: %s",
            message.request_id,
            message.registered_model_name,
            message.model_version,
            "new item" if report.accepted_count else "duplicate or empty, not added",
        )
