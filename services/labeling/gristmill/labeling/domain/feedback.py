"""Feedback becomes data: what users said about a model's replies (serving's ``feedback recorded``) becomes
items of the chat project the model learned from, and of that project's preference project.

The rules (``feedback_items``), for a chat project whose ``settings.feedback.import_feedback`` is on:

- a thumbs-down, or a rating at or below ``review_at_or_below_rating``: a chat item to review, the
  conversation sent with the model's reply as its last turn, no annotation (annotators rate, flag or fix it);
- an edit: a chat item ending with the edited reply, answered by annotator ``feedback`` with that reply (an
  accepted answer: an SFT row once the project's ``annotations_per_item`` is met, at once when that is 1),
  and, when ``preference_project_id`` is set, a preference item (prompt: the conversation sent; candidates:
  the edit, then the original reply) ranked by ``feedback`` with the edit first;
- a regenerate (the user kept one of two replies): a preference item, kept over discarded;
- a thumbs-up, a comment, a higher rating: nothing.

A pair needs two different replies: an edit that changed nothing (or of an empty reply) makes no pair, nor
does a regenerate that gave the same reply twice. A thumbs-down on an empty reply leaves the conversation at
its prompt: the reviewer writes the reply.

Every item goes through the target project's import pipeline (``ImportSession``): every turn normalised and
PII-masked, exact and near duplicates dropped. Its external id is ``feedback:<request_id>:review|edit|pair``,
so the same feedback delivered again, even as a new event, creates nothing new; it carries the metadata
``request_id``, ``model``, ``model_version`` and ``feedback_kind``.

A project that is missing, of another task type, or has feedback off is not an error (it may live in another
installation, or have changed since the model was trained): the feedback is logged and skipped; a missing
preference project skips only the pair. Feedback that cannot make the item its kind calls for (no request id,
turns that make no conversation, an empty edit or regenerated reply, a rating out of range) is
``InvalidArgumentError``: the event handler's transaction rolls back and the record goes to the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial

from gristmill.core.chat import (
    ASSISTANT,
    MAX_RATING,
    MIN_RATING,
    ChatMessage,
    Conversation,
    FeedbackKind,
    unbiased_pair,
)
from gristmill.core.chat_formats import FORMAT_DPO, FORMAT_OPENAI
from gristmill.core.errors import InvalidArgumentError, NotFoundError
from gristmill.labeling.domain.cleaning import TextMasker, normalize_turn
from gristmill.labeling.domain.common import organization
from gristmill.labeling.domain.imports import ImportUseCases
from gristmill.labeling.domain.model import (
    FeedbackSettings,
    ImportReport,
    ItemSource,
    Project,
    RawRecord,
    Response,
    TaskType,
)
from gristmill.labeling.domain.parsing import MAX_EXTERNAL_ID_CHARS, RecordBuilder
from gristmill.labeling.domain.ports import ItemWriter
from gristmill.labeling.tasks import labeling_task

log = logging.getLogger(__name__)

# Who answers an edit's chat item and ranks a feedback pair: the user, through serving.
FEEDBACK_ANNOTATOR = "feedback"
SOURCE_NAME = "feedback"


@dataclass(frozen=True)
class Generation:
    """One reply of a model: the conversation it was sent and what it answered."""

    request_id: str
    model_name: str
    model_version: int
    messages: tuple[ChatMessage, ...]
    reply: str
    # The chat project the model learned from; "" when unknown.
    labeling_project_id: str


@dataclass(frozen=True)
class Feedback:
    organization_id: str
    kind: FeedbackKind
    generation: Generation
    # RATING: 1-5.
    rating: int = 0
    # EDIT: the reply as the user corrected it.
    edited_reply: str = ""
    # REGENERATE: the reply the user kept, and the one they discarded.
    kept_reply: str = ""
    discarded_reply: str = ""


class Target(StrEnum):
    CHAT = "chat"
    PREFERENCE = "preference"


@dataclass(frozen=True)
class FeedbackItem:
    """An item feedback makes, before cleaning: which project gets it, and the feedback annotator's answer."""

    target: Target
    external_id: str
    conversation: Conversation
    metadata: dict[str, str] = field(default_factory=dict)
    # The feedback annotator's response (an edit's reply, a pair's ranking); None: nobody answered yet.
    response: Response | None = None


def feedback_items(feedback: Feedback, settings: FeedbackSettings) -> list[FeedbackItem]:
    """The items ``feedback`` makes under a chat project's ``settings`` (the rules in the module doc);
    ``InvalidArgumentError`` when the feedback cannot make the item its kind calls for."""
    generation = feedback.generation
    kind = feedback.kind
    if kind is FeedbackKind.RATING and not MIN_RATING <= feedback.rating <= MAX_RATING:
        raise InvalidArgumentError(f"rating: {feedback.rating} is out of range; ratings are {MIN_RATING}-{MAX_RATING}")
    review = kind is FeedbackKind.THUMBS_DOWN or (
        kind is FeedbackKind.RATING and feedback.rating <= settings.review_at_or_below_rating
    )
    metadata = {
        "request_id": generation.request_id,
        "model": generation.model_name,
        "model_version": str(generation.model_version),
        "feedback_kind": kind.value,
    }
    if kind is FeedbackKind.RATING:
        metadata["rating"] = str(feedback.rating)
    prompt = generation.messages
    if review:
        # An empty reply leaves the conversation at its prompt: the reviewer writes the reply.
        reply = generation.reply.strip()
        messages = (*prompt, ChatMessage(ASSISTANT, generation.reply)) if reply else prompt
        return [_chat(generation, "review", Conversation(messages), metadata)]
    if kind is FeedbackKind.EDIT:
        edited = _reply(feedback.edited_reply, "edited_reply")
        items = [
            _chat(
                generation,
                "edit",
                Conversation((*prompt, ChatMessage(ASSISTANT, edited))),
                metadata,
                Response(reply=edited),
            )
        ]
        # No pair when the model's reply was empty or the edit left it as it was: nothing to prefer.
        if settings.preference_project_id and _distinct(edited, generation.reply):
            items.append(_pair(generation, prompt, edited, generation.reply, metadata))
        return items
    if kind is FeedbackKind.REGENERATE:
        kept = _reply(feedback.kept_reply, "kept_reply")
        discarded = _reply(feedback.discarded_reply, "discarded_reply")
        if not settings.preference_project_id or not _distinct(kept, discarded):
            return []
        return [_pair(generation, prompt, kept, discarded, metadata)]
    return []


def _distinct(better: str, worse: str) -> bool:
    return bool(worse.strip()) and better.strip() != worse.strip()


def _reply(text: str, field_name: str) -> str:
    if not text.strip():
        raise InvalidArgumentError(f"{field_name}: empty; this kind of feedback needs a reply")
    return text


def _chat(
    generation: Generation,
    what: str,
    conversation: Conversation,
    metadata: dict[str, str],
    response: Response | None = None,
) -> FeedbackItem:
    return FeedbackItem(
        Target.CHAT, feedback_external_id(generation.request_id, what), conversation, metadata, response
    )


def _pair(
    generation: Generation, prompt: tuple[ChatMessage, ...], better: str, worse: str, metadata: dict[str, str]
) -> FeedbackItem:
    """A preference item with the two replies in an order that does not give the better one away, ranked by
    the feedback annotator."""
    candidates, ranking = unbiased_pair(better, worse)
    return FeedbackItem(
        Target.PREFERENCE,
        feedback_external_id(generation.request_id, "pair"),
        Conversation(prompt, candidates),
        metadata,
        Response(ranking=ranking[:1]),
    )


def feedback_external_id(request_id: str, what: str) -> str:
    """``feedback:<request_id>:<what>``: the same feedback always names the same item. A request id too long
    for an external id is replaced by its SHA-256."""
    if not request_id:
        raise InvalidArgumentError("request_id: empty; feedback must name the generation it is about")
    external_id = f"feedback:{request_id}:{what}"
    if len(external_id) > MAX_EXTERNAL_ID_CHARS:
        external_id = f"feedback:sha256-{hashlib.sha256(request_id.encode()).hexdigest()}:{what}"
    return external_id


WriterFactory = Callable[[Project], ItemWriter]


@dataclass(frozen=True)
class FeedbackOutcome:
    """What one feedback stored: per target project, its import report (``accepted_count`` 0: a duplicate)."""

    reports: dict[str, ImportReport] = field(default_factory=dict)

    @property
    def stored_count(self) -> int:
        return sum(report.accepted_count for report in self.reports.values())


_PROJECT_PAGE = 200


class FeedbackUseCases(ImportUseCases):
    """Feedback goes through the import pipeline (``ImportUseCases.ingest_records``)."""

    def ingest_feedback(self, feedback: Feedback, writer_for: WriterFactory) -> FeedbackOutcome:
        """Turn ``feedback`` into the items its chat project's settings ask for, written through ``writer_for``'s
        writers (an event handler's transaction). Projects that cannot take it are logged and skipped."""
        generation = feedback.generation
        org = organization(feedback.organization_id)
        chat = self._feedback_project(
            org, self._chat_project_of(org, generation.labeling_project_id), TaskType.CHAT, "chat project"
        )
        if chat is None or not chat.settings.feedback.import_feedback:
            if chat is not None:
                log.info(
                    "feedback on %s ignored: project %s does not import feedback",
                    generation.request_id,
                    chat.project_id,
                )
            return FeedbackOutcome()
        settings = chat.settings.feedback
        items = feedback_items(feedback, settings)
        if not items:
            log.debug("feedback %s on %s stores nothing", feedback.kind.value, generation.request_id)
            return FeedbackOutcome()
        projects: dict[Target, Project | None] = {Target.CHAT: chat}
        if any(item.target is Target.PREFERENCE for item in items):
            projects[Target.PREFERENCE] = self._feedback_project(
                org, settings.preference_project_id, TaskType.PREFERENCE, f"preference project of {chat.project_id}"
            )
        reports: dict[str, ImportReport] = {}
        for target, project in projects.items():
            chosen = [item for item in items if item.target is target]
            if project is None or not chosen:
                continue
            reports[project.project_id] = self.ingest_records(
                writer_for(project),
                project,
                partial(_records, items=chosen, project=project),
                source=ItemSource.FEEDBACK,
                source_name=SOURCE_NAME,
                annotator_id=FEEDBACK_ANNOTATOR,
            )
        return FeedbackOutcome(reports)

    def _chat_project_of(self, org: str, project_id: str) -> str:
        """The chat project feedback on a model of ``project_id`` goes to: the project itself, or, for a model
        that learned from a preference project (DPO), the chat project whose feedback feeds that one; replies of
        both kinds of model are conversations to review, and their pairs go where the DPO data came from."""
        try:
            project = self.store.get_project(org, project_id) if project_id else None
        except (NotFoundError, InvalidArgumentError):
            return project_id
        if project is None or project.task_type is not TaskType.PREFERENCE:
            return project_id
        offset = 0
        while page := self.store.list_projects(org, offset=offset, limit=_PROJECT_PAGE):
            for candidate in page:
                if candidate.task_type is TaskType.CHAT and candidate.settings.feedback.preference_project_id == (
                    project_id
                ):
                    return candidate.project_id
            offset += len(page)
        return project_id

    def _feedback_project(self, org: str, project_id: str, task_type: TaskType, what: str) -> Project | None:
        if not project_id:
            log.info("feedback for a model with no %s ignored", what)
            return None
        try:
            project = self.store.get_project(org, project_id)
        except (NotFoundError, InvalidArgumentError):
            log.info("feedback for unknown %s %r ignored", what, project_id)
            return None
        if project.task_type is not task_type:
            log.info("feedback for %s %r ignored: it is a %s project", what, project_id, project.task_type.value)
            return None
        return project


def _records(builder: RecordBuilder, items: Sequence[FeedbackItem], project: Project) -> list[RawRecord]:
    """The import records of ``items`` (the conversation is checked by ``build_conversation``), each with the
    feedback annotator's response and the labels it votes for."""
    task = labeling_task(project.task_type)
    records = []
    for line, item in enumerate(items, start=1):
        response = item.response
        ranking = response.ranking if response is not None else ()
        source_format = FORMAT_DPO if item.target is Target.PREFERENCE else FORMAT_OPENAI
        record = builder.build_conversation(
            line, item.external_id, item.conversation, ranking, item.metadata, source_format
        )
        if response is not None:
            response = _cleaned_answer(response, project)
            record = replace(record, response=response, labels=task.labels_of(response))
        records.append(record)
    return records


def _cleaned_answer(response: Response, project: Project) -> Response:
    """An edit's reply cleaned like the item's turns (the import cleans a record's conversation, not its
    response): the answer then repeats the item's last turn exactly, and no unmasked text is stored."""
    if not response.reply:
        return response
    reply, _ = TextMasker(project.settings.cleaning.pii).mask(normalize_turn(response.reply))
    return replace(response, reply=reply)
