"""Feedback on generations: what users say about a reply becomes a ``feedback recorded`` event that labeling
turns into review items and preference pairs (labeling's ``events/feedback.py``).

Every finished reply is remembered here (``RecentGenerations``: bounded, oldest first out, for ``ttl_s``) so
that feedback can carry its generation in full, as the event promises; the event is written to the outbox in
the RPC's own transaction, so acknowledged feedback is never lost. Generations live in this process's memory:
feedback must reach the replica that answered (or arrive within the window), else NOT_FOUND says so.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from threading import Lock
from typing import Protocol

from gristmill.core.chat import MAX_RATING, MIN_RATING, ChatMessage, FeedbackKind
from gristmill.core.errors import InvalidArgumentError, NotFoundError

DEFAULT_CAPACITY = 50_000
DEFAULT_TTL_S = 24 * 3600.0
MAX_FEEDBACK_TEXT = 32_768


@dataclass(frozen=True)
class GenerationRecord:
    """A finished reply: what feedback events carry as their generation."""

    organization_id: str
    request_id: str
    registered_model_name: str
    version: int
    deployment: str
    messages: tuple[ChatMessage, ...]
    reply: str
    # The request's sampling parameters as text ("temperature", "top_p", "seed", "max_tokens", "stop").
    sampling: Mapping[str, str]
    labeling_project_id: str = ""
    created: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class FeedbackInput:
    request_id: str
    kind: FeedbackKind
    rating: int = 0
    edited_reply: str = ""
    kept_reply: str = ""
    discarded_reply: str = ""
    text: str = ""


def validate_feedback(feedback: FeedbackInput) -> FeedbackInput:
    """INVALID_ARGUMENT naming the field unless ``feedback`` has what its kind needs."""
    if not feedback.request_id:
        raise InvalidArgumentError("request_id is required: the id of the reply the feedback is about")
    for name in ("edited_reply", "kept_reply", "discarded_reply", "text"):
        if len(getattr(feedback, name)) > MAX_FEEDBACK_TEXT:
            raise InvalidArgumentError(f"{name} has more than {MAX_FEEDBACK_TEXT} characters")
    if feedback.kind is FeedbackKind.RATING and not MIN_RATING <= feedback.rating <= MAX_RATING:
        raise InvalidArgumentError(
            f"rating must be between {MIN_RATING} and {MAX_RATING} for a rating, got {feedback.rating}"
        )
    if feedback.kind is not FeedbackKind.RATING and feedback.rating:
        raise InvalidArgumentError("rating is only for feedback of kind rating")
    if feedback.kind is FeedbackKind.EDIT and not feedback.edited_reply.strip():
        raise InvalidArgumentError("edited_reply is required for an edit: the reply as the user corrected it")
    if feedback.kind is FeedbackKind.REGENERATE and not (feedback.kept_reply and feedback.discarded_reply):
        raise InvalidArgumentError("a regenerate needs kept_reply and discarded_reply (the two replies compared)")
    if feedback.kind is FeedbackKind.TEXT and not feedback.text.strip():
        raise InvalidArgumentError("text is required for feedback of kind text")
    return feedback


class RecentGenerations:
    """The last ``capacity`` finished replies, each for ``ttl_s``. Thread-safe."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[tuple[str, str], GenerationRecord] = OrderedDict()
        self._lock = Lock()

    def remember(self, record: GenerationRecord) -> None:
        with self._lock:
            key = (record.organization_id, record.request_id)
            self._items[key] = record
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, organization_id: str, request_id: str) -> GenerationRecord:
        """The reply ``request_id`` of the organisation; NOT_FOUND when unknown, expired or another's."""
        with self._lock:
            record = self._items.get((organization_id, request_id))
        if record is None or self._clock() - record.created > self.ttl_s:
            raise NotFoundError(
                f"no reply with request id {request_id!r} is known here: feedback must name the request_id of a "
                f"reply this server gave in the last {self.ttl_s / 3600:.0f} h (replies are remembered by the "
                "replica that answered)"
            )
        return record

    def __len__(self) -> int:
        return len(self._items)


class FeedbackPublisher(Protocol):
    """Writes ``feedback recorded`` and ``generation logged`` events (PII-masked) durably: when a method returns,
    its event is in the outbox. Both block (a database transaction): call them off the event loop."""

    def publish(self, organization_id: str, record: GenerationRecord, feedback: FeedbackInput) -> None: ...

    def log_generation(self, record: GenerationRecord) -> None:
        """A sampled reply (the deployment's ``prediction_logging.sample_rate``), for labeling to see."""
        ...
