"""What the pages show and do, as plain functions of the labeling service's API and the signed-in session.

No HTML here and no gRPC: ``Calls`` is the one thing this needs of the services (``gristmill.console.gateway``
gives it), so the rules are tested with a fake.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.client.conversations import chat_response, conversation_of
from gristmill.console.domain.sessions import Session
from gristmill.core.chat import CHAT_FLAGS, MAX_RATING, MIN_RATING, ChatMessage
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.paging import MAX_PAGE_SIZE

R = TypeVar("R")

# The page labels these task types (image projects, later, are labeled elsewhere).
LABELABLE = frozenset(
    {common_pb2.TASK_TYPE_TEXT_CLASSIFICATION, common_pb2.TASK_TYPE_CHAT, common_pb2.TASK_TYPE_PREFERENCE}
)
# What an item asks of its annotator, by the content it holds.
CLASSIFICATION, CHAT, PREFERENCE = "classification", "chat", "preference"
TIE = "tie"
# An answer: its labels (classification), or a response (chat, preference).
Answer = tuple[list[str], pb.Response | None]
# Number keys 1-9 choose a label: a schema with more labels is chosen from the list by mouse.
MAX_KEYED_LABELS = 9
# The page renews its lease half-way through it, but not more often than this.
MIN_RENEW_EVERY_S = 5
# Conflicts shown on the review page at once (each resolved one leaves the queue).
REVIEW_PAGE = 50


class Calls(Protocol):
    labeling: Any

    def call(self, service: str, method: Callable[..., Awaitable[R]], request: Any, api_key: str) -> Awaitable[R]: ...


@dataclass(frozen=True)
class LabelChoice:
    name: str
    description: str
    key: str  # the number key that chooses it ("" past the ninth)
    suggested: bool  # the model's pre-label (uncertainty-first projects)
    probability: float | None


@dataclass(frozen=True)
class TaskView:
    project_id: str
    task_id: str
    item_id: str
    text: str
    labels: list[LabelChoice]
    remaining: int
    # The label already given, when the annotator went back (undo) to change it.
    chosen: str = ""
    annotation_id: str = ""
    # How often the open page renews the lease (0: no lease, e.g. an item revisited to change its label).
    renew_every_s: int = 0
    # CLASSIFICATION, CHAT (the turns, then the reply to keep or rewrite, rate and flag) or PREFERENCE (the
    # prompt's turns, then the candidates to choose between, or a tie).
    kind: str = CLASSIFICATION
    turns: tuple[ChatMessage, ...] = ()
    reply: str | None = None  # chat: the item's own reply (None: the annotator writes it)
    candidates: tuple[str, ...] = ()
    # The answer already given, when the annotator went back (undo) to change it.
    answer: pb.Response | None = None

    @property
    def shown_reply(self) -> str:
        """chat: the reply in the editor (the annotator's rewrite when they went back to it)."""
        if self.answer is not None and self.answer.reply:
            return self.answer.reply
        return self.reply or ""

    @property
    def choice(self) -> str:
        """preference: the candidate chosen before ("0", "1", ...), "tie", or ""."""
        if self.answer is None:
            return ""
        return TIE if self.answer.tie else str(self.answer.ranking[0]) if self.answer.ranking else ""


@dataclass(frozen=True)
class ProjectView:
    project: pb.Project
    labelable: bool

    @property
    def reviewable(self) -> bool:
        """The review page resolves this project's conflicts (classification; chat and preference: the CLI)."""
        return self.project.task_type == common_pb2.TASK_TYPE_TEXT_CLASSIFICATION

    @property
    def progress(self) -> float:
        stats = self.project.stats
        return stats.labeled_item_count / stats.item_count if stats.item_count else 0.0


@dataclass(frozen=True)
class AgreementMatrix:
    """Pairwise agreement between a project's annotators: Cohen's kappa (None where undefined), observed
    agreement and the items both labeled, for each ordered pair."""

    annotators: list[str]
    kappa: dict[tuple[str, str], float | None]
    observed: dict[tuple[str, str], float]
    items: dict[tuple[str, str], int]

    @classmethod
    def of(cls, report: pb.AgreementReport) -> AgreementMatrix:
        kappa: dict[tuple[str, str], float | None] = {}
        observed: dict[tuple[str, str], float] = {}
        items: dict[tuple[str, str], int] = {}
        for pair in report.pairs:
            value = pair.cohen_kappa if pair.HasField("cohen_kappa") else None
            for key in ((pair.annotator_a, pair.annotator_b), (pair.annotator_b, pair.annotator_a)):
                kappa[key], observed[key], items[key] = value, pair.observed_agreement, int(pair.item_count)
        names = sorted({a.annotator_id for a in report.annotators} | {name for key in kappa for name in key})
        return cls(names, kappa, observed, items)


def chart_data(report: pb.AgreementReport, versions: list[pb.DatasetVersion]) -> dict[str, Any]:
    """What the project page's charts draw: the newest version's items per label (all splits), and each
    annotator's agreement with the consensus."""
    labels: dict[str, int] = {}
    if versions:
        for split in versions[0].splits:
            for label, count in split.item_count_by_label.items():
                labels[label] = labels.get(label, 0) + int(count)
    return {
        "version": versions[0].version_number if versions else None,
        "labels": dict(sorted(labels.items())),
        "annotators": [
            {"id": a.annotator_id, "agreement": a.consensus_agreement, "annotations": int(a.annotation_count)}
            for a in sorted(report.annotators, key=lambda a: a.annotator_id)
        ],
    }


class Desk:
    """The labeling pages' operations for one signed-in user."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def _labeling(self, session: Session, method: str, request: Any) -> Any:
        return await self.calls.call("labeling", getattr(self.calls.labeling, method), request, session.api_key)

    async def projects(self, session: Session) -> list[ProjectView]:
        out: list[ProjectView] = []
        token = ""
        while True:
            page = common_pb2.PageRequest(page_size=MAX_PAGE_SIZE, page_token=token)
            response = await self._labeling(session, "ListProjects", pb.ListProjectsRequest(page=page))
            out += [ProjectView(p, p.task_type in LABELABLE) for p in response.projects]
            token = response.next_page_token
            if not token:
                return out

    async def project(self, session: Session, project_id: str) -> ProjectView:
        project = await self._labeling(session, "GetProject", pb.GetProjectRequest(project_id=project_id))
        return ProjectView(project, project.task_type in LABELABLE)

    async def agreement(self, session: Session, project_id: str) -> pb.AgreementReport:
        report: pb.AgreementReport = await self._labeling(
            session, "GetAgreement", pb.GetAgreementRequest(project_id=project_id)
        )
        return report

    async def versions(self, session: Session, project_id: str) -> list[pb.DatasetVersion]:
        """The project's published versions, newest first (one page)."""
        request = pb.ListDatasetVersionsRequest(project_id=project_id, page=common_pb2.PageRequest(page_size=50))
        response = await self._labeling(session, "ListDatasetVersions", request)
        return sorted(response.dataset_versions, key=lambda v: -v.version_number)

    async def conflicts(self, session: Session, project: ProjectView) -> list[pb.Item]:
        """Items whose annotations disagree with no majority (the reviewer's queue), with their annotations."""
        if not project.reviewable:
            raise FailedPreconditionError(
                "the review page resolves classification conflicts; resolve chat and preference items with "
                "`gristmill items resolve`"
            )
        request = pb.ListItemsRequest(
            project_id=project.project.project_id,
            statuses=[pb.ITEM_STATUS_CONFLICT],
            include_annotations=True,
            page=common_pb2.PageRequest(page_size=REVIEW_PAGE),
        )
        response = await self._labeling(session, "ListItems", request)
        return list(response.items)

    async def resolve(self, session: Session, project_id: str, item_id: str, label: str) -> None:
        """The reviewer's decision for a conflict: the label that wins."""
        session.require_label()
        if not label:
            raise InvalidArgumentError("choose the label that wins")
        request = pb.ResolveItemRequest(
            project_id=project_id, item_id=item_id, reviewer_id=session.annotator_id, labels=[label]
        )
        await self._labeling(session, "ResolveItem", request)

    async def publish(self, session: Session, project_id: str, description: str) -> pb.PublishDatasetVersionResponse:
        """An immutable version of the project's labeled items (the default 0.8 / 0.1 / 0.1 stratified split)."""
        session.require_label()
        request = pb.PublishDatasetVersionRequest(project_id=project_id, description=description.strip())
        response: pb.PublishDatasetVersionResponse = await self._labeling(session, "PublishDatasetVersion", request)
        return response

    async def next_task(
        self, session: Session, project_id: str, *, project: ProjectView | None = None
    ) -> TaskView | None:
        """The item this annotator labels next (the one they hold, if any), in the project's order. ``project``:
        the project as the page already read it (after a submission the next item needs only NextTask: one call
        per key press, not two)."""
        if project is not None and not project.labelable:
            raise FailedPreconditionError(
                f"project {project_id!r} holds {common_pb2.TaskType.Name(project.project.task_type)} items, which "
                "this console cannot label yet: use `gristmill label`"
            )
        request = pb.NextTaskRequest(project_id=project_id, annotator_id=session.annotator_id)
        response = await self._labeling(session, "NextTask", request)
        if not response.HasField("task"):
            return None
        view = _view(
            project_id,
            response.task.task_id,
            response.task.item,
            response.task.label_schema,
            int(response.remaining_count),
        )
        lease_left_s = response.task.lease_expire_time.ToSeconds() - int(time.time())
        return replace(view, renew_every_s=max(MIN_RENEW_EVERY_S, lease_left_s // 2))

    async def renew(self, session: Session, project_id: str, task_id: str) -> None:
        """Extend the lease on the item the page shows (by the project's lease length)."""
        session.require_label()
        request = pb.RenewTaskRequest(project_id=project_id, task_id=task_id, annotator_id=session.annotator_id)
        await self._labeling(session, "RenewTask", request)

    async def submit(self, session: Session, project_id: str, task_id: str, item_id: str, answer: Answer) -> str:
        """Record this annotator's answer (``answer_from`` a form) for the item they hold; returns the annotation's
        id (for undo)."""
        session.require_label()
        labels, response = answer
        request = pb.SubmitAnnotationRequest(
            project_id=project_id, item_id=item_id, annotator_id=session.annotator_id, task_id=task_id, labels=labels
        )
        if response is not None:
            request.response.CopyFrom(response)
        annotation = await self._labeling(session, "SubmitAnnotation", request)
        return str(annotation.annotation_id)

    async def skip(self, session: Session, project_id: str, task_id: str) -> None:
        session.require_label()
        request = pb.SkipTaskRequest(project_id=project_id, task_id=task_id, annotator_id=session.annotator_id)
        await self._labeling(session, "SkipTask", request)

    async def revisit(self, session: Session, project_id: str, item_id: str, annotation_id: str) -> TaskView:
        """The item of the annotator's last annotation, with their label chosen, to change it (undo)."""
        item = await self._labeling(session, "GetItem", pb.GetItemRequest(project_id=project_id, item_id=item_id))
        mine = [a for a in item.annotations if a.annotation_id == annotation_id]
        if not mine or mine[0].annotator_id != session.annotator_id:
            raise FailedPreconditionError("there is no annotation of yours to undo here")
        schema = await self._labeling(session, "GetLabelSchema", pb.GetLabelSchemaRequest(project_id=project_id))
        chosen = mine[0].labels[0] if mine[0].labels else ""
        view = _view(project_id, "", item, schema, 0, chosen=chosen, annotation_id=annotation_id)
        return replace(view, answer=mine[0].response) if mine[0].HasField("response") else view

    async def change(self, session: Session, project_id: str, annotation_id: str, answer: Answer) -> None:
        session.require_label()
        labels, response = answer
        request = pb.UpdateAnnotationRequest(
            project_id=project_id, annotation_id=annotation_id, annotator_id=session.annotator_id, labels=labels
        )
        if response is not None:
            request.response.CopyFrom(response)
        await self._labeling(session, "UpdateAnnotation", request)


def answer_from(form: Mapping[str, str], flags: Sequence[str] = ()) -> Answer:
    """The labels (classification) or the response (chat, preference) a labeling form says, by its ``kind``;
    ``flags``: the chat flags ticked (a repeated field). A field that says nothing usable is INVALID_ARGUMENT
    naming what to do, before any call."""
    kind = form.get("kind", "") or CLASSIFICATION
    if kind == CLASSIFICATION:
        label = form.get("label", "")
        if not label:
            raise InvalidArgumentError("choose a label first (its number key, or click it)")
        return [label], None
    if kind == PREFERENCE:
        choice = form.get("choice", "")
        if choice == TIE:
            return [], pb.Response(tie=True)
        if not choice.isdigit():
            raise InvalidArgumentError("choose the better reply first (its number key), or t for a tie")
        return [], pb.Response(ranking=[int(choice)])
    if kind == CHAT:
        rating = form.get("rating", "")
        if rating and not (rating.isdigit() and MIN_RATING <= int(rating) <= MAX_RATING):
            raise InvalidArgumentError(f"a rating is {MIN_RATING}-{MAX_RATING} (or none)")
        unknown = sorted(set(flags) - set(CHAT_FLAGS))
        if unknown:
            raise InvalidArgumentError(f"{unknown[0]!r} is not a flag; flags: {', '.join(CHAT_FLAGS)}")
        own = form.get("own_reply")
        # The reply as the annotator left it in the editor; unchanged, it is the item's own (kept).
        written = form.get("reply", "").replace("\r\n", "\n").strip()
        if not written and own is None:
            raise InvalidArgumentError("write the assistant's reply first (e edits it)")
        new_reply = None if own is not None and written == own.replace("\r\n", "\n").strip() else written
        return [], chat_response(own, new_reply, int(rating or 0), flags)
    raise InvalidArgumentError(f"unknown kind of item {kind!r}: {CLASSIFICATION}, {CHAT} or {PREFERENCE}")


def _view(
    project_id: str,
    task_id: str,
    item: pb.Item,
    schema: pb.LabelSchema,
    remaining: int,
    *,
    chosen: str = "",
    annotation_id: str = "",
) -> TaskView:
    # The latest prediction's top label is the pre-label (uncertainty-first projects attach them).
    suggestion, probabilities = "", {}
    if item.predictions:
        latest = max(item.predictions, key=lambda p: (p.create_time.seconds, p.create_time.nanos))
        probabilities = dict(latest.probabilities)
        suggestion = latest.labels[0] if latest.labels else ""
    labels = [
        LabelChoice(
            name=d.name,
            description=d.description,
            key=str(i + 1) if i < MAX_KEYED_LABELS else "",
            suggested=d.name == suggestion,
            probability=probabilities.get(d.name),
        )
        for i, d in enumerate(schema.labels)
    ]
    view = TaskView(
        project_id, task_id, item.item_id, item.text, labels, remaining, chosen or suggestion, annotation_id
    )
    if item.WhichOneof("content") != "conversation":
        return view
    conversation = conversation_of(item.conversation)
    if conversation.candidates:
        return replace(view, kind=PREFERENCE, turns=conversation.messages, candidates=conversation.candidates)
    return replace(view, kind=CHAT, turns=conversation.prompt, reply=conversation.final_reply)
