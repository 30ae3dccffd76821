"""Use cases of items, task leases, annotations, reviews and agreement."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.labeling.domain import agreement as agreement_math
from gristmill.labeling.domain.common import (
    MAX_COMMENT_CHARS,
    UseCases,
    check_text,
    checked_item_id,
    checked_project_id,
    organization,
)
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.model import (
    AgreementReport,
    Annotation,
    Item,
    ItemSource,
    ItemStatus,
    Prediction,
    Project,
    Response,
    SpanLabel,
    Task,
)
from gristmill.labeling.domain.ordering import OfferRule
from gristmill.labeling.domain.ports import PredictionTarget
from gristmill.labeling.domain.schema import validate_lease_seconds
from gristmill.labeling.tasks import labeling_task

MAX_PREDICTIONS_PER_CALL = 10_000


class AnnotationUseCases(UseCases):
    def get_item(self, organization_id: str, project_id: str, item_id: str) -> Item:
        return self.store.get_item(
            organization(organization_id), checked_project_id(project_id), checked_item_id(item_id)
        )

    def list_items(
        self,
        organization_id: str,
        project_id: str,
        *,
        statuses: Sequence[ItemStatus],
        source: ItemSource | None,
        include_annotations: bool,
        offset: int,
        limit: int,
    ) -> list[Item]:
        return self.store.list_items(
            organization(organization_id),
            checked_project_id(project_id),
            statuses=statuses,
            source=source,
            include_annotations=include_annotations,
            offset=offset,
            limit=limit,
        )

    def next_task(
        self, organization_id: str, project_id: str, annotator_id: str, lease_seconds: int | None
    ) -> tuple[Task | None, int]:
        validate_id(annotator_id, what="annotator_id")
        project = self.project_rules(organization_id, project_id)
        seconds = _lease_seconds(project, lease_seconds)
        return self.store.next_task(
            project.organization_id,
            project.project_id,
            annotator_id,
            lease_seconds=seconds,
            now=self.clock(),
            offer=OfferRule.for_annotator(project, annotator_id),
        )

    def submit_annotation(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        annotator_id: str,
        *,
        task_id: str,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
        response: Response | None = None,
    ) -> Annotation:
        validate_id(annotator_id, what="annotator_id")
        if task_id:
            validate_id(task_id, what="task_id")
        project = self.project_rules(organization_id, project_id)
        item_id = checked_item_id(item_id)
        checked, content = self._check_annotation(project, item_id, labels, response, spans, comment)
        return self.store.submit_annotation(
            project.organization_id,
            project.project_id,
            item_id,
            annotator_id,
            task_id=task_id,
            labels=checked,
            spans=(),
            comment=comment,
            now=self.clock(),
            consensus=ConsensusRule.of(project),
            response=content,
        )

    def update_annotation(
        self,
        organization_id: str,
        project_id: str,
        annotation_id: str,
        annotator_id: str,
        *,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
        response: Response | None = None,
    ) -> Annotation:
        validate_id(annotator_id, what="annotator_id")
        validate_id(annotation_id, what="annotation_id")
        project = self.project_rules(organization_id, project_id)
        item_id = ""
        if project.task_type.generative:
            item_id = self.store.annotation_item_id(project.organization_id, project.project_id, annotation_id)
        checked, content = self._check_annotation(project, item_id, labels, response, spans, comment)
        return self.store.update_annotation(
            project.organization_id,
            project.project_id,
            annotation_id,
            annotator_id,
            labels=checked,
            spans=(),
            comment=comment,
            now=self.clock(),
            consensus=ConsensusRule.of(project),
            response=content,
        )

    def skip_task(self, organization_id: str, project_id: str, task_id: str, annotator_id: str, reason: str) -> None:
        validate_id(task_id, what="task_id")
        validate_id(annotator_id, what="annotator_id")
        check_text("reason", reason, MAX_COMMENT_CHARS)
        self.store.skip_task(
            organization(organization_id), checked_project_id(project_id), task_id, annotator_id, reason, self.clock()
        )

    def renew_task(
        self, organization_id: str, project_id: str, task_id: str, annotator_id: str, lease_seconds: int | None
    ) -> datetime:
        validate_id(task_id, what="task_id")
        validate_id(annotator_id, what="annotator_id")
        project = self.project_rules(organization_id, project_id)
        seconds = _lease_seconds(project, lease_seconds)
        return self.store.renew_task(
            project.organization_id, project.project_id, task_id, annotator_id, lease_seconds=seconds, now=self.clock()
        )

    def attach_predictions(
        self, organization_id: str, project_id: str, predictions: Sequence[tuple[PredictionTarget, Prediction]]
    ) -> int:
        if len(predictions) > MAX_PREDICTIONS_PER_CALL:
            raise InvalidArgumentError(
                f"predictions: at most {MAX_PREDICTIONS_PER_CALL:,} per call, got {len(predictions):,}; send batches"
            )
        project = self.project_rules(organization_id, project_id)
        now = self.clock()
        checked = []
        for index, (target, prediction) in enumerate(predictions):
            where = f"predictions[{index}]"
            if bool(target.item_id) == bool(target.external_id):
                raise InvalidArgumentError(f"{where}: set exactly one of item_id and external_id")
            if target.item_id:
                validate_id(target.item_id, what=f"{where}.item_id")
            checked.append((target, validate_prediction(project, prediction, where, now)))
        return self.store.attach_predictions(project.organization_id, project.project_id, checked)

    def resolve_item(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        reviewer_id: str,
        labels: Sequence[str],
        comment: str,
        response: Response | None = None,
    ) -> Item:
        validate_id(reviewer_id, what="reviewer_id")
        project = self.project_rules(organization_id, project_id)
        item_id = checked_item_id(item_id)
        checked, content = self._check_annotation(project, item_id, labels, response, (), comment)
        return self.store.resolve_item(
            project.organization_id,
            project.project_id,
            item_id,
            reviewer_id,
            checked,
            comment,
            self.clock(),
            consensus=ConsensusRule.of(project),
            response=content if not content.empty else None,
        )

    def _check_annotation(
        self,
        project: Project,
        item_id: str,
        labels: Sequence[str],
        response: Response | None,
        spans: Sequence[SpanLabel],
        comment: str,
    ) -> tuple[tuple[str, ...], Response]:
        """The labels and response to store, as the project's task type says (INVALID_ARGUMENT otherwise)."""
        if spans:
            raise InvalidArgumentError("spans: span labels are for token classification projects, which come later")
        check_text("comment", comment, MAX_COMMENT_CHARS)
        task = labeling_task(project.task_type, error=FailedPreconditionError)
        item = None
        if task.generative:
            if not item_id:
                raise InvalidArgumentError(f"item_id: required to check a response in a {task.name} project")
            # A response is checked against its item (a ranking names the item's candidates).
            item = self.store.get_item(project.organization_id, project.project_id, item_id)
        return task.check_response(labels, response or Response(), project.label_schema, item, "")

    def get_agreement(self, organization_id: str, project_id: str, annotator_ids: Sequence[str]) -> AgreementReport:
        for index, annotator in enumerate(annotator_ids):
            validate_id(annotator, what=f"annotator_ids[{index}]")
        project = self.project_rules(organization_id, project_id)
        rated, counts, by_status = self.store.rated_items(project.organization_id, project.project_id, annotator_ids)
        report = agreement_math.agreement_report(
            project.project_id,
            rated,
            labels=project.label_schema.names,
            multi_label=project.task_type.multi_label,
            annotation_counts=counts,
            agreed=by_status.get(ItemStatus.LABELED, 0),
            conflicts=by_status.get(ItemStatus.CONFLICT, 0),
            resolved=by_status.get(ItemStatus.RESOLVED, 0),
            now=self.clock(),
        )
        if not project.task_type.generative:
            return report
        # The nominal statistics above are over the derived votes (accepted/rejected, the best candidate);
        # ratings and rankings have statistics of their own.
        responses = self.store.rated_responses(project.organization_id, project.project_id, annotator_ids)
        extra = agreement_math.generative_agreement(
            [
                {
                    annotator: agreement_math.ResponseRating(r.rating, r.ranking, r.tie, candidates)
                    for annotator, r in by_annotator.items()
                }
                for _, candidates, by_annotator in responses
            ]
        )
        return replace(
            report,
            rating_krippendorff_alpha=extra.rating_alpha,
            rated_item_count=extra.rated_item_count,
            ranking_pair_agreement=extra.ranking_pair_agreement,
            ranked_item_count=extra.ranked_item_count,
        )


def validate_prediction(project: Project, prediction: Prediction, where: str, now: datetime) -> Prediction:
    if not prediction.model_name:
        raise InvalidArgumentError(f"{where}.prediction.model_name must not be empty")
    if prediction.model_version < 0:
        raise InvalidArgumentError(f"{where}.prediction.model_version must not be negative")
    names = set(project.label_schema.names)
    for label in prediction.labels:
        if label not in names:
            raise InvalidArgumentError(f"{where}.prediction.labels: {label!r} is not a label of the project's schema")
    for label, probability in prediction.probabilities.items():
        if label not in names:
            raise InvalidArgumentError(
                f"{where}.prediction.probabilities: {label!r} is not a label of the project's schema"
            )
        if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
            raise InvalidArgumentError(f"{where}.prediction.probabilities[{label!r}] = {probability} is outside [0, 1]")
    return replace(prediction, create_time=prediction.create_time or now)


def _lease_seconds(project: Project, override: int | None) -> int:
    """A lease's length: the request's override (validated) or the project's setting."""
    return project.settings.lease_seconds if override is None else validate_lease_seconds(override, "lease_seconds")
