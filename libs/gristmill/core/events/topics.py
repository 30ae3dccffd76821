"""The platform's events: which ``gristmill.api.events.v1`` message travels on which topic.

This is the one copy of the table in ``protos/README.md``; ``events.proto`` repeats each topic on a
``Topic:`` comment line and a unit test checks that the two agree. Services build their catalog with
``platform_catalog()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from gristmill.api.events.v1 import events_pb2
from gristmill.core.events.envelope import EventCatalog

DATASET_VERSION_PUBLISHED = "gristmill.labeling.dataset-version-published.v1"
JOB_STATE_CHANGED = "gristmill.training.job-state-changed.v1"
MODEL_VERSION_REGISTERED = "gristmill.registry.model-version-registered.v1"
ALIAS_CHANGED = "gristmill.registry.alias-changed.v1"
PREDICTION_LOGGED = "gristmill.serving.prediction-logged.v1"
GENERATION_LOGGED = "gristmill.serving.generation-logged.v1"
GENERATION_OUTCOMES = "gristmill.serving.generation-outcomes.v1"
FEEDBACK_RECORDED = "gristmill.serving.feedback-recorded.v1"
USAGE_RECORDED = "gristmill.metering.usage-recorded.v1"

PLATFORM_TOPICS: Mapping[type[Message], str] = {
    events_pb2.DatasetVersionPublished: DATASET_VERSION_PUBLISHED,
    events_pb2.JobStateChanged: JOB_STATE_CHANGED,
    events_pb2.ModelVersionRegistered: MODEL_VERSION_REGISTERED,
    events_pb2.AliasChanged: ALIAS_CHANGED,
    events_pb2.PredictionLogged: PREDICTION_LOGGED,
    events_pb2.GenerationLogged: GENERATION_LOGGED,
    events_pb2.GenerationOutcomes: GENERATION_OUTCOMES,
    events_pb2.FeedbackRecorded: FEEDBACK_RECORDED,
    events_pb2.UsageRecorded: USAGE_RECORDED,
}


def platform_catalog() -> EventCatalog:
    """A catalog with every platform event registered on its topic."""
    catalog = EventCatalog()
    for message_type, topic in PLATFORM_TOPICS.items():
        catalog.register(message_type, topic)
    return catalog


@dataclass(frozen=True)
class ConsumerGroup:
    """One consumer group a service runs: its default name, the topics it reads, and the service setting
    (``GRISTMILL_<SERVICE>_<SETTING>``) that renames it for an installation sharing Kafka with others."""

    service: str
    setting: str
    default: str
    topics: tuple[str, ...]

    @property
    def variable(self) -> str:
        return f"GRISTMILL_{self.service.upper()}_{self.setting.upper()}"


# The one copy of every consumer group's default name: the services' settings default to these, the CLI
# renames and positions them for an installation.
LABELING_ACTIVE_LEARNING = ConsumerGroup(
    "labeling", "active_learning_group", "labeling-active-learning", (PREDICTION_LOGGED,)
)
# Its own group, so that a backlog of feedback never delays active learning (and the reverse).
LABELING_FEEDBACK = ConsumerGroup(
    "labeling", "feedback_group", "labeling-feedback", (GENERATION_LOGGED, FEEDBACK_RECORDED)
)
TRAINING_AUTO_TRAIN = ConsumerGroup("training", "auto_train_group", "training-auto-train", (DATASET_VERSION_PUBLISHED,))
REGISTRY_JOB_EVENTS = ConsumerGroup("registry", "job_events_group", "registry-job-events", (JOB_STATE_CHANGED,))
REGISTRY_PROMOTION = ConsumerGroup("registry", "promotion_group", "registry-promotion", (MODEL_VERSION_REGISTERED,))
REGISTRY_ONLINE_GATE = ConsumerGroup(
    "registry", "online_gate_group", "registry-online-gate", (FEEDBACK_RECORDED, GENERATION_OUTCOMES)
)
SERVING_ALIASES = ConsumerGroup("serving", "consumer_group", "serving", (ALIAS_CHANGED,))
ADMIN_METERING = ConsumerGroup("admin", "metering_group", "admin-metering", (USAGE_RECORDED,))

CONSUMER_GROUPS: tuple[ConsumerGroup, ...] = (
    TRAINING_AUTO_TRAIN,
    REGISTRY_JOB_EVENTS,
    REGISTRY_PROMOTION,
    REGISTRY_ONLINE_GATE,
    SERVING_ALIASES,
    LABELING_ACTIVE_LEARNING,
    LABELING_FEEDBACK,
    ADMIN_METERING,
)
