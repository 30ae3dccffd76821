"""Row ↔ domain conversions of the labeling tables (JSON columns included), shared by the aggregate stores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from gristmill.core.chat import Conversation
from gristmill.labeling.domain.model import (
    ActiveLearningSettings,
    Annotation,
    CleaningSettings,
    Consensus,
    CustomPiiPattern,
    DatasetVersion,
    DroppedRecord,
    DropReason,
    FeedbackSettings,
    ImportReport,
    Item,
    ItemSource,
    ItemStatus,
    LabelDefinition,
    LabelSchema,
    NearDuplicatePolicy,
    ObjectRef,
    PiiKind,
    PiiSettings,
    Prediction,
    ProjectSettings,
    Response,
    SpanLabel,
    Split,
    SplitRatios,
    SplitStrategy,
    SplitSummary,
    TaskOrdering,
    TaskType,
)


def consensus_values(status: ItemStatus, consensus: Consensus) -> dict[str, Any]:
    return {
        "status": status.value,
        "consensus_labels": list(consensus.labels),
        "consensus_agreement": consensus.agreement,
        "consensus_tied": consensus.tied,
    }


def labels_to_json(labels: Sequence[LabelDefinition]) -> list[dict[str, str]]:
    return [{"name": label.name, "description": label.description} for label in labels]


def schema_from_row(project_id: str, row: Row[Any]) -> LabelSchema:
    labels = tuple(LabelDefinition(entry["name"], entry.get("description", "")) for entry in row.labels)
    return LabelSchema(project_id, row.version, labels, row.create_time)


def annotation_values(annotation: Annotation, project_pk: int, item_seq: int) -> dict[str, Any]:
    return {
        "annotation_id": annotation.annotation_id,
        "project_pk": project_pk,
        "item_seq": item_seq,
        "annotator_id": annotation.annotator_id,
        "labels": list(annotation.labels),
        "spans": [asdict(span) for span in annotation.spans],
        "comment": annotation.comment,
        "response": response_to_json(annotation.response),
        "schema_version": annotation.schema_version,
        "create_time": annotation.create_time,
        "update_time": annotation.update_time,
    }


def annotation_from_row(row: Row[Any]) -> Annotation:
    return Annotation(
        annotation_id=row.annotation_id,
        project_id=row.project_id,
        item_id=row.item_id,
        annotator_id=row.annotator_id,
        labels=tuple(row.labels),
        schema_version=row.schema_version,
        create_time=row.create_time,
        update_time=row.update_time,
        spans=tuple(SpanLabel(**span) for span in row.spans),
        comment=row.comment,
        response=response_from_json(row.response) or Response(),
    )


def response_to_json(response: Response | None) -> dict[str, Any] | None:
    """A response as stored (only the fields that are set); None for no response (classification)."""
    if response is None or response.empty:
        return None
    out: dict[str, Any] = {}
    if response.reply:
        out["reply"] = response.reply
    if response.rating:
        out["rating"] = response.rating
    if response.flags:
        out["flags"] = list(response.flags)
    if response.ranking:
        out["ranking"] = list(response.ranking)
    if response.tie:
        out["tie"] = True
    return out


def response_from_json(value: Any) -> Response | None:
    if not value:
        return None
    return Response(
        reply=value.get("reply", ""),
        rating=int(value.get("rating", 0)),
        flags=tuple(value.get("flags", ())),
        ranking=tuple(int(i) for i in value.get("ranking", ())),
        tie=bool(value.get("tie", False)),
    )


def item_from_row(
    row: Row[Any],
    project_id: str,
    annotations: Sequence[Annotation],
    predictions: Sequence[Prediction],
    *,
    generative: bool = False,
) -> Item:
    """The item of a row; ``generative`` (the project's task type is chat or preference) parses its text,
    the canonical JSON of its conversation."""
    return Item(
        item_id=row.item_id,
        project_id=project_id,
        external_id=row.external_id,
        text=row.text,
        metadata=dict(row.metadata),
        status=ItemStatus(row.status),
        source=ItemSource(row.source),
        import_id=row.import_id,
        near_duplicate_of_item_id=row.near_duplicate_of,
        consensus=Consensus(
            labels=tuple(row.consensus_labels),
            agreement=row.consensus_agreement,
            tied=row.consensus_tied,
            resolved_by=row.resolved_by,
        ),
        create_time=row.create_time,
        annotations=tuple(annotations),
        predictions=tuple(predictions),
        conversation=Conversation.from_json(row.text) if generative else None,
        resolved_response=response_from_json(row.resolved_response) if generative else None,
    )


def is_generative(project: Row[Any]) -> bool:
    """Whether a project row's items are conversations (its task type is chat or preference)."""
    return TaskType(project.task_type).generative


def settings_to_json(settings: ProjectSettings) -> dict[str, Any]:
    cleaning = settings.cleaning
    return {
        "annotations_per_item": settings.annotations_per_item,
        "task_ordering": settings.task_ordering.value,
        "lease_seconds": settings.lease_seconds,
        "cleaning": {
            "max_text_chars": cleaning.max_text_chars,
            "near_duplicate_policy": cleaning.near_duplicate_policy.value,
            "near_duplicate_threshold": cleaning.near_duplicate_threshold,
            "pii": {
                "store_raw_text": cleaning.pii.store_raw_text,
                "kinds": sorted(kind.value for kind in cleaning.pii.kinds),
                "custom_patterns": [{"name": p.name, "regex": p.regex} for p in cleaning.pii.custom_patterns],
            },
            "max_tokens": cleaning.max_tokens,
            "tokenizer": cleaning.tokenizer,
        },
        "active_learning": {"import_uncertain_predictions": settings.active_learning.import_uncertain_predictions},
        "feedback": {
            "import_feedback": settings.feedback.import_feedback,
            "preference_project_id": settings.feedback.preference_project_id,
            "review_at_or_below_rating": settings.feedback.review_at_or_below_rating,
        },
    }


def settings_from_json(data: dict[str, Any]) -> ProjectSettings:
    cleaning = data["cleaning"]
    pii = cleaning["pii"]
    return ProjectSettings(
        annotations_per_item=int(data["annotations_per_item"]),
        task_ordering=TaskOrdering(data["task_ordering"]),
        lease_seconds=int(data["lease_seconds"]),
        cleaning=CleaningSettings(
            max_text_chars=int(cleaning["max_text_chars"]),
            near_duplicate_policy=NearDuplicatePolicy(cleaning["near_duplicate_policy"]),
            near_duplicate_threshold=float(cleaning["near_duplicate_threshold"]),
            pii=PiiSettings(
                store_raw_text=bool(pii["store_raw_text"]),
                kinds=frozenset(PiiKind(kind) for kind in pii["kinds"]),
                custom_patterns=tuple(CustomPiiPattern(p["name"], p["regex"]) for p in pii["custom_patterns"]),
            ),
            # Projects stored before token limits existed have none.
            max_tokens=int(cleaning.get("max_tokens", 0)),
            tokenizer=str(cleaning.get("tokenizer", "")),
        ),
        active_learning=ActiveLearningSettings(
            import_uncertain_predictions=bool(data["active_learning"]["import_uncertain_predictions"])
        ),
        feedback=_feedback_from_json(data.get("feedback")),
    )


def _feedback_from_json(data: dict[str, Any] | None) -> FeedbackSettings:
    """A project stored before feedback settings existed has none: the defaults (feedback off)."""
    if data is None:
        return FeedbackSettings()
    return FeedbackSettings(
        import_feedback=bool(data["import_feedback"]),
        preference_project_id=str(data["preference_project_id"]),
        review_at_or_below_rating=int(data["review_at_or_below_rating"]),
    )


def report_to_json(report: ImportReport) -> dict[str, Any]:
    data = asdict(report)
    data["create_time"] = report.create_time.isoformat()
    data["drops"] = [{**asdict(drop), "reason": drop.reason.value} for drop in report.drops]
    return data


def report_from_json(data: dict[str, Any]) -> ImportReport:
    """A stored report; one stored before a counter existed reads it as 0 (the dataclasses' defaults)."""
    values = dict(data)
    values["create_time"] = datetime.fromisoformat(values["create_time"])
    values["drops"] = [DroppedRecord(**{**drop, "reason": DropReason(drop["reason"])}) for drop in values["drops"]]
    values["pii_masked_by_kind"] = dict(values["pii_masked_by_kind"])
    return ImportReport(**values)


def ref_json(ref: ObjectRef) -> dict[str, Any]:
    return {"key": ref.key, "sha256": ref.sha256, "size_bytes": ref.size_bytes}


def version_values(version: DatasetVersion, project_pk: int) -> dict[str, Any]:
    return {
        "dataset_version_id": version.dataset_version_id,
        "project_pk": project_pk,
        "version_number": version.version_number,
        "content_sha256": version.content_sha256,
        "task_type": version.task_type.value,
        "schema_version": version.schema_version,
        "label_map": list(version.label_map),
        "ratios": {"train": version.ratios.train, "validation": version.ratios.validation, "test": version.ratios.test},
        "seed": version.seed,
        "split_strategy": version.split_strategy.value,
        "splits": [
            {
                "split": s.split.value,
                "item_count": s.item_count,
                "item_count_by_label": s.item_count_by_label,
                "file": ref_json(s.file),
            }
            for s in version.splits
        ],
        "manifest": ref_json(version.manifest),
        "description": version.description,
        "create_time": version.create_time,
    }


def version_from_row(row: Row[Any], project: Row[Any]) -> DatasetVersion:
    return DatasetVersion(
        dataset_version_id=row.dataset_version_id,
        organization_id=project.organization_id,
        project_id=project.project_id,
        version_number=row.version_number,
        task_type=TaskType(row.task_type),
        schema_version=row.schema_version,
        label_map=tuple(row.label_map),
        ratios=SplitRatios(**row.ratios),
        seed=row.seed,
        split_strategy=SplitStrategy(row.split_strategy),
        splits=tuple(
            SplitSummary(
                split=Split(s["split"]),
                item_count=s["item_count"],
                item_count_by_label=dict(s["item_count_by_label"]),
                file=ObjectRef(**s["file"]),
            )
            for s in row.splits
        ),
        manifest=ObjectRef(**row.manifest),
        content_sha256=row.content_sha256,
        description=row.description,
        create_time=row.create_time,
    )
