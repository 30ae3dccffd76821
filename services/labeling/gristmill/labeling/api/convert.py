"""proto ↔ domain conversions. Zero values become their documented defaults here, on the way in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.core.chat import ChatMessage, Conversation
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.ports import PredictionTarget
from gristmill.labeling.tasks import labeling_task

E = TypeVar("E", bound=StrEnum)

_SPLIT_TO_PROTO = {
    m.Split.TRAIN: common_pb2.DATASET_SPLIT_TRAIN,
    m.Split.VALIDATION: common_pb2.DATASET_SPLIT_VALIDATION,
    m.Split.TEST: common_pb2.DATASET_SPLIT_TEST,
}
_SPLIT_FROM_PROTO = {value: split for split, value in _SPLIT_TO_PROTO.items()}


def _enum_in(enum: type[E], wrapper: Any, value: int, field: str, default: E | None = None) -> E:
    """A proto enum number as the domain enum (matched by name); UNSPECIFIED gives ``default``."""
    try:
        name = wrapper.Name(value)
    except ValueError:
        raise InvalidArgumentError(f"{field}: {value} is not a known value") from None
    if name.endswith("_UNSPECIFIED"):
        if default is None:
            raise InvalidArgumentError(f"{field} must be set")
        return default
    try:
        return enum(name)
    except ValueError:
        raise InvalidArgumentError(f"{field}: {name} is not supported yet") from None


def _enum_out(wrapper: Any, value: StrEnum) -> Any:
    return wrapper.Value(value.value)


def timestamp(value: datetime | None) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


# --------------------------------------------------------------------------- projects


def task_type_in(value: int) -> m.TaskType:
    return _enum_in(m.TaskType, common_pb2.TaskType, value, "task_type")


# The domain's PII kinds are named without the proto's prefix (the import report counts masks as ``EMAIL`` ...).
_PII_KIND_TO_PROTO = {kind: pb.PiiKind.Value(f"PII_KIND_{kind.value}") for kind in m.PiiKind}
_PII_KIND_FROM_PROTO: dict[int, m.PiiKind] = {value: kind for kind, value in _PII_KIND_TO_PROTO.items()}


def pii_kind_in(value: int, field: str) -> m.PiiKind:
    """A proto ``PiiKind`` as the domain's; UNSPECIFIED or an unknown number is INVALID_ARGUMENT."""
    if value not in _PII_KIND_FROM_PROTO:
        known = ", ".join(pb.PiiKind.Name(v) for v in sorted(_PII_KIND_TO_PROTO.values()))
        raise InvalidArgumentError(f"{field}: {value} is not a PII kind; use one of {known}")
    return _PII_KIND_FROM_PROTO[value]


def labels_in(labels: Iterable[pb.LabelDefinition]) -> list[m.LabelDefinition]:
    return [m.LabelDefinition(label.name, label.description) for label in labels]


def settings_in(settings: pb.ProjectSettings) -> m.ProjectSettings:
    cleaning = settings.cleaning
    pii = cleaning.pii
    kinds = frozenset(pii_kind_in(kind, f"settings.cleaning.pii.kinds[{i}]") for i, kind in enumerate(pii.kinds))
    return m.ProjectSettings(
        annotations_per_item=settings.annotations_per_item or 1,
        task_ordering=_enum_in(
            m.TaskOrdering, pb.TaskOrdering, settings.task_ordering, "settings.task_ordering", m.TaskOrdering.SEQUENTIAL
        ),
        lease_seconds=settings.lease_seconds or 600,
        cleaning=m.CleaningSettings(
            max_text_chars=cleaning.max_text_chars or 10_000,
            near_duplicate_policy=_enum_in(
                m.NearDuplicatePolicy,
                pb.NearDuplicatePolicy,
                cleaning.near_duplicate_policy,
                "settings.cleaning.near_duplicate_policy",
                m.NearDuplicatePolicy.DROP,
            ),
            near_duplicate_threshold=cleaning.near_duplicate_threshold or 0.9,
            pii=m.PiiSettings(
                store_raw_text=pii.store_raw_text,
                kinds=kinds,
                custom_patterns=tuple(m.CustomPiiPattern(p.name, p.regex) for p in pii.custom_patterns),
            ),
            max_tokens=cleaning.max_tokens,
            tokenizer=cleaning.tokenizer,
        ),
        active_learning=m.ActiveLearningSettings(
            import_uncertain_predictions=settings.active_learning.import_uncertain_predictions
        ),
        feedback=m.FeedbackSettings(
            import_feedback=settings.feedback.import_feedback,
            preference_project_id=settings.feedback.preference_project_id,
            review_at_or_below_rating=settings.feedback.review_at_or_below_rating
            or m.FeedbackSettings.review_at_or_below_rating,
        ),
    )


def settings_out(settings: m.ProjectSettings) -> pb.ProjectSettings:
    cleaning = settings.cleaning
    return pb.ProjectSettings(
        annotations_per_item=settings.annotations_per_item,
        task_ordering=_enum_out(pb.TaskOrdering, settings.task_ordering),
        lease_seconds=settings.lease_seconds,
        cleaning=pb.CleaningSettings(
            max_text_chars=cleaning.max_text_chars,
            near_duplicate_policy=_enum_out(pb.NearDuplicatePolicy, cleaning.near_duplicate_policy),
            near_duplicate_threshold=cleaning.near_duplicate_threshold,
            pii=pb.PiiSettings(
                store_raw_text=cleaning.pii.store_raw_text,
                kinds=[_PII_KIND_TO_PROTO[kind] for kind in sorted(cleaning.pii.kinds)],
                custom_patterns=[pb.CustomPiiPattern(name=p.name, regex=p.regex) for p in cleaning.pii.custom_patterns],
            ),
            max_tokens=cleaning.max_tokens,
            tokenizer=cleaning.tokenizer,
        ),
        active_learning=pb.ActiveLearningSettings(
            import_uncertain_predictions=settings.active_learning.import_uncertain_predictions
        ),
        feedback=pb.FeedbackSettings(
            import_feedback=settings.feedback.import_feedback,
            preference_project_id=settings.feedback.preference_project_id,
            review_at_or_below_rating=settings.feedback.review_at_or_below_rating,
        ),
    )


def schema_out(schema: m.LabelSchema) -> pb.LabelSchema:
    return pb.LabelSchema(
        project_id=schema.project_id,
        version=schema.version,
        labels=[pb.LabelDefinition(name=label.name, description=label.description) for label in schema.labels],
        create_time=timestamp(schema.create_time),
    )


def project_out(project: m.Project) -> pb.Project:
    stats = project.stats
    return pb.Project(
        project_id=project.project_id,
        organization_id=project.organization_id,
        display_name=project.display_name,
        description=project.description,
        task_type=_enum_out(common_pb2.TaskType, project.task_type),
        label_schema=schema_out(project.label_schema),
        settings=settings_out(project.settings),
        stats=pb.ProjectStats(
            item_count=stats.item_count,
            labeled_item_count=stats.labeled_item_count,
            conflict_item_count=stats.conflict_item_count,
            annotation_count=stats.annotation_count,
            dataset_version_count=stats.dataset_version_count,
        ),
        create_time=timestamp(project.create_time),
        update_time=timestamp(project.update_time),
    )


# --------------------------------------------------------------------------- imports


def import_options_in(options: pb.ImportOptions) -> m.ImportOptions:
    mapping = options.field_mapping
    csv = options.csv
    return m.ImportOptions(
        project_id=options.project_id,
        format=_enum_in(m.ImportFormat, pb.ImportFormat, options.format, "options.format"),
        request_id=options.request_id,
        source_name=options.source_name,
        field_mapping=m.FieldMapping(
            external_id_field=mapping.external_id_field or "id",
            text_field=mapping.text_field or "text",
            label_field=mapping.label_field or "label",
            metadata_fields=tuple(mapping.metadata_fields),
            multi_label_separator=mapping.multi_label_separator or "|",
        ),
        csv=m.CsvOptions(
            delimiter=csv.delimiter or ",",
            has_header=csv.has_header,
            column_names=tuple(csv.column_names),
            disable_quoting=csv.disable_quoting,
        ),
        existing_label_annotator_id=options.existing_label_annotator_id or "import",
    )


def report_out(report: m.ImportReport) -> pb.ImportReport:
    return pb.ImportReport(
        import_id=report.import_id,
        project_id=report.project_id,
        source_name=report.source_name,
        received_count=report.received_count,
        accepted_count=report.accepted_count,
        normalized_count=report.normalized_count,
        dropped_empty_count=report.dropped_empty_count,
        dropped_too_long_count=report.dropped_too_long_count,
        dropped_exact_duplicate_count=report.dropped_exact_duplicate_count,
        dropped_near_duplicate_count=report.dropped_near_duplicate_count,
        flagged_near_duplicate_count=report.flagged_near_duplicate_count,
        dropped_existing_external_id_count=report.dropped_existing_external_id_count,
        pii_masked_item_count=report.pii_masked_item_count,
        pii_masked_by_kind=report.pii_masked_by_kind,
        imported_label_count=report.imported_label_count,
        drops=[
            pb.DroppedRecord(
                line_number=drop.line_number,
                external_id=drop.external_id,
                reason=_enum_out(pb.DropReason, drop.reason),
                duplicate_of_item_id=drop.duplicate_of_item_id,
                similarity=drop.similarity,
                removed_turn_count=drop.removed_turn_count,
                token_count=drop.token_count,
            )
            for drop in report.drops
        ],
        drops_truncated=report.drops_truncated,
        create_time=timestamp(report.create_time),
        duration_ms=report.duration_ms,
        records_by_format=report.records_by_format,
        truncated_count=report.truncated_count,
        truncated_turn_count=report.truncated_turn_count,
        dropped_too_many_tokens_count=report.dropped_too_many_tokens_count,
    )


# --------------------------------------------------------------------------- items and annotations


def annotation_out(annotation: m.Annotation) -> pb.Annotation:
    return pb.Annotation(
        annotation_id=annotation.annotation_id,
        project_id=annotation.project_id,
        item_id=annotation.item_id,
        annotator_id=annotation.annotator_id,
        labels=list(annotation.labels),
        spans=[pb.SpanLabel(start=s.start, end=s.end, label=s.label) for s in annotation.spans],
        comment=annotation.comment,
        schema_version=annotation.schema_version,
        create_time=timestamp(annotation.create_time),
        update_time=timestamp(annotation.update_time),
        response=response_out(annotation.response),
    )


def response_in(response: pb.Response) -> m.Response:
    return m.Response(
        reply=response.reply,
        rating=response.rating,
        flags=tuple(response.flags),
        ranking=tuple(response.ranking),
        tie=response.tie,
    )


def response_out(response: m.Response | None) -> pb.Response | None:
    if response is None or response.empty:
        return None
    return pb.Response(
        reply=response.reply,
        rating=response.rating,
        flags=list(response.flags),
        ranking=list(response.ranking),
        tie=response.tie,
    )


def conversation_in(conversation: pb.Conversation) -> Conversation:
    """A request's conversation; its turns are checked where records are (the import's ``RecordBuilder``)."""
    return Conversation(
        tuple(ChatMessage(m.role, m.content, m.tool_calls, m.tool_call_id, m.name) for m in conversation.messages),
        tuple(conversation.candidates),
    )


def conversation_out(conversation: Conversation) -> pb.Conversation:
    return pb.Conversation(
        messages=[
            common_pb2.ChatMessage(
                role=m.role, content=m.content, tool_calls=m.tool_calls, tool_call_id=m.tool_call_id, name=m.name
            )
            for m in conversation.messages
        ],
        candidates=list(conversation.candidates),
    )


def prediction_out(prediction: m.Prediction) -> pb.Prediction:
    return pb.Prediction(
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        labels=list(prediction.labels),
        probabilities=prediction.probabilities,
        create_time=timestamp(prediction.create_time),
    )


def item_out(item: m.Item) -> pb.Item:
    content: dict[str, Any] = (
        {"conversation": conversation_out(item.conversation)} if item.conversation is not None else {"text": item.text}
    )
    return pb.Item(
        **content,
        item_id=item.item_id,
        project_id=item.project_id,
        external_id=item.external_id,
        metadata=item.metadata,
        status=_enum_out(pb.ItemStatus, item.status),
        source=_enum_out(pb.ItemSource, item.source),
        import_id=item.import_id,
        near_duplicate_of_item_id=item.near_duplicate_of_item_id,
        annotations=[annotation_out(a) for a in item.annotations],
        predictions=[prediction_out(p) for p in item.predictions],
        consensus=pb.Consensus(
            labels=list(item.consensus.labels),
            agreement=item.consensus.agreement,
            tied=item.consensus.tied,
            resolved_by=item.consensus.resolved_by,
        ),
        create_time=timestamp(item.create_time),
        resolved_response=response_out(item.resolved_response),
    )


def statuses_in(values: Sequence[int]) -> list[m.ItemStatus]:
    return [_enum_in(m.ItemStatus, pb.ItemStatus, v, f"statuses[{i}]") for i, v in enumerate(values)]


def source_in(value: int) -> m.ItemSource | None:
    if value == pb.ITEM_SOURCE_UNSPECIFIED:
        return None
    return _enum_in(m.ItemSource, pb.ItemSource, value, "source")


def spans_in(spans: Iterable[pb.SpanLabel]) -> list[m.SpanLabel]:
    return [m.SpanLabel(s.start, s.end, s.label) for s in spans]


def task_out(task: m.Task) -> pb.Task:
    return pb.Task(
        task_id=task.task_id,
        annotator_id=task.annotator_id,
        item=item_out(task.item),
        label_schema=schema_out(task.label_schema),
        lease_expire_time=timestamp(task.lease_expire_time),
    )


def prediction_inputs_in(inputs: Iterable[pb.PredictionInput]) -> list[tuple[PredictionTarget, m.Prediction]]:
    out = []
    for entry in inputs:
        which = entry.WhichOneof("item")
        target = PredictionTarget(
            item_id=entry.item_id if which == "item_id" else "",
            external_id=entry.external_id if which == "external_id" else "",
        )
        p = entry.prediction
        created = p.create_time.ToDatetime(tzinfo=UTC) if p.HasField("create_time") else None
        out.append(
            (target, m.Prediction(p.model_name, p.model_version, tuple(p.labels), dict(p.probabilities), created))
        )
    return out


# --------------------------------------------------------------------------- agreement


def agreement_out(report: m.AgreementReport) -> pb.AgreementReport:
    out = pb.AgreementReport(
        project_id=report.project_id,
        item_count=report.item_count,
        annotator_count=report.annotator_count,
        observed_agreement=report.observed_agreement,
        agreed_item_count=report.agreed_item_count,
        conflict_item_count=report.conflict_item_count,
        resolved_item_count=report.resolved_item_count,
        compute_time=timestamp(report.compute_time),
    )
    if report.fleiss_kappa is not None:
        out.fleiss_kappa = report.fleiss_kappa
    if report.krippendorff_alpha is not None:
        out.krippendorff_alpha = report.krippendorff_alpha
    if report.rating_krippendorff_alpha is not None:
        out.rating_krippendorff_alpha = report.rating_krippendorff_alpha
    if report.ranking_pair_agreement is not None:
        out.ranking_pair_agreement = report.ranking_pair_agreement
    out.rated_item_count = report.rated_item_count
    out.ranked_item_count = report.ranked_item_count
    for pair in report.pairs:
        entry = out.pairs.add(
            annotator_a=pair.annotator_a,
            annotator_b=pair.annotator_b,
            item_count=pair.item_count,
            observed_agreement=pair.observed_agreement,
            confusion=pb.ConfusionMatrix(labels=list(pair.confusion.labels), counts=list(pair.confusion.counts)),
        )
        if pair.cohen_kappa is not None:
            entry.cohen_kappa = pair.cohen_kappa
    for annotator in report.annotators:
        a = out.annotators.add(
            annotator_id=annotator.annotator_id,
            annotation_count=annotator.annotation_count,
            consensus_agreement=annotator.consensus_agreement,
        )
        if annotator.mean_cohen_kappa is not None:
            a.mean_cohen_kappa = annotator.mean_cohen_kappa
    return out


# --------------------------------------------------------------------------- dataset versions


def ratios_in(ratios: pb.SplitRatios) -> m.SplitRatios:
    return m.SplitRatios(ratios.train, ratios.validation, ratios.test)


def strategy_in(value: int) -> m.SplitStrategy:
    return _enum_in(m.SplitStrategy, pb.SplitStrategy, value, "split_strategy", m.SplitStrategy.STRATIFIED)


def splits_in(values: Sequence[int]) -> list[m.Split]:
    out = []
    for i, value in enumerate(values):
        split = _SPLIT_FROM_PROTO.get(value)  # type: ignore[call-overload]
        if split is None:
            raise InvalidArgumentError(f"splits[{i}]: {value} is not train, validation or test")
        out.append(split)
    return out


def object_ref_out(ref: m.ObjectRef) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)


def split_out(split: m.Split) -> Any:
    return _SPLIT_TO_PROTO[split]


def dataset_version_out(version: m.DatasetVersion) -> pb.DatasetVersion:
    return pb.DatasetVersion(
        dataset_version_id=version.dataset_version_id,
        project_id=version.project_id,
        version_number=version.version_number,
        task_type=_enum_out(common_pb2.TaskType, version.task_type),
        schema_version=version.schema_version,
        label_map=common_pb2.LabelMap(labels=list(version.label_map)),
        ratios=pb.SplitRatios(
            train=version.ratios.train, validation=version.ratios.validation, test=version.ratios.test
        ),
        seed=version.seed,
        split_strategy=_enum_out(pb.SplitStrategy, version.split_strategy),
        splits=[
            pb.SplitSummary(
                split=split_out(s.split),
                item_count=s.item_count,
                item_count_by_label=s.item_count_by_label,
                file=object_ref_out(s.file),
            )
            for s in version.splits
        ],
        manifest=object_ref_out(version.manifest),
        content_sha256=version.content_sha256,
        description=version.description,
        create_time=timestamp(version.create_time),
        row_format=labeling_task(version.task_type, error=FailedPreconditionError).row_format,
    )
