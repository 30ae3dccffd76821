"""proto ↔ domain conversions. Enums convert by name; an unknown enum number is INVALID_ARGUMENT."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.values import FileRef, Signature, TensorSpec
from gristmill.registry.domain.model import (
    DEFAULT_ALPHA,
    AliasCause,
    AliasChange,
    BaseModel,
    BaseModelSource,
    CardText,
    Comparison,
    Lineage,
    Metric,
    MetricFilter,
    MetricGoal,
    ModelCard,
    ModelVersion,
    OnlineGate,
    OnlineTest,
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    RegisteredModel,
    VersionStatus,
)

_SPLIT_PREFIX = "DATASET_SPLIT_"


# ------------------------------------------------------------------------------------------ enums


def task_from_proto(value: int) -> str:
    try:
        return common_pb2.TaskType.Name(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgumentError(f"task {value} is not a known TaskType") from None


def task_to_proto(task: str) -> common_pb2.TaskType.ValueType:
    return common_pb2.TaskType.Value(task or "TASK_TYPE_UNSPECIFIED")


def split_from_proto(value: int) -> str:
    try:
        name = common_pb2.DatasetSplit.Name(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgumentError(f"split {value} is not a known DatasetSplit") from None
    return "" if name == "DATASET_SPLIT_UNSPECIFIED" else name.removeprefix(_SPLIT_PREFIX).lower()


def split_to_proto(split: str) -> common_pb2.DatasetSplit.ValueType:
    return common_pb2.DatasetSplit.Value(_SPLIT_PREFIX + (split.upper() or "UNSPECIFIED"))


def status_to_proto(status: VersionStatus) -> pb.ModelVersionStatus.ValueType:
    return pb.ModelVersionStatus.Value(f"MODEL_VERSION_STATUS_{status.value}")


def status_from_proto(value: int) -> VersionStatus:
    try:
        name = pb.ModelVersionStatus.Name(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgumentError(f"status {value} is not a known ModelVersionStatus") from None
    if name == "MODEL_VERSION_STATUS_UNSPECIFIED":
        raise InvalidArgumentError("statuses must not contain MODEL_VERSION_STATUS_UNSPECIFIED")
    return VersionStatus(name.removeprefix("MODEL_VERSION_STATUS_"))


def cause_to_proto(cause: AliasCause) -> pb.AliasChangeCause.ValueType:
    return pb.AliasChangeCause.Value(f"ALIAS_CHANGE_CAUSE_{cause.value}")


def _enum_name(enum: object, value: int, what: str) -> str:
    try:
        return str(enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        raise InvalidArgumentError(f"{what} {value} is not a known value") from None


def timestamp(value: datetime | None) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


# ------------------------------------------------------------------------------------------ shared messages


def file_to_proto(ref: FileRef | None) -> common_pb2.ObjectRef:
    if ref is None:
        return common_pb2.ObjectRef()
    return common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)


def file_from_proto(ref: common_pb2.ObjectRef) -> FileRef:
    return FileRef(ref.key, ref.sha256, ref.size_bytes)


def signature_from_proto(sig: common_pb2.ModelSignature) -> Signature | None:
    if not sig.inputs and not sig.outputs:
        return None

    def specs(items: list[common_pb2.TensorSpec]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in items)

    return Signature(specs(list(sig.inputs)), specs(list(sig.outputs)))


def signature_to_proto(sig: Signature | None) -> common_pb2.ModelSignature:
    if sig is None:
        return common_pb2.ModelSignature()

    def specs(items: tuple[TensorSpec, ...]) -> list[common_pb2.TensorSpec]:
        return [common_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in items]

    return common_pb2.ModelSignature(inputs=specs(sig.inputs), outputs=specs(sig.outputs))


def metric_from_proto(m: common_pb2.Metric) -> Metric:
    return Metric(m.name, m.value, split_from_proto(m.split), m.step if m.HasField("step") else None)


def metric_to_proto(m: Metric) -> common_pb2.Metric:
    out = common_pb2.Metric(name=m.name, value=m.value, split=split_to_proto(m.split))
    if m.step is not None:
        out.step = m.step
    return out


def lineage_from_proto(lin: common_pb2.Lineage) -> Lineage:
    base: BaseModelSource | None = None
    if lin.HasField("base_model"):
        b = lin.base_model
        base = BaseModelSource(b.base_model_name, b.object_prefix, b.local_path, b.content_sha256)
    ds = lin.dataset_version
    return Lineage(
        training_job_id=lin.training_job_id,
        project_id=ds.project_id,
        dataset_version_id=ds.dataset_version_id,
        dataset_manifest=file_from_proto(ds.manifest) if ds.HasField("manifest") and ds.manifest.key else None,
        dataset_files=tuple(file_from_proto(f) for f in lin.dataset_files),
        base_model=base,
        hyper_parameters=dict(lin.hyper_parameters),
        ray_run_name=lin.ray_run_name,
        code_version=lin.code_version,
    )


def dataset_ref_to_proto(lin: Lineage) -> common_pb2.DatasetVersionRef:
    ref = common_pb2.DatasetVersionRef(project_id=lin.project_id, dataset_version_id=lin.dataset_version_id)
    if lin.dataset_manifest is not None:
        ref.manifest.CopyFrom(file_to_proto(lin.dataset_manifest))
    return ref


def lineage_to_proto(lin: Lineage) -> common_pb2.Lineage:
    out = common_pb2.Lineage(
        training_job_id=lin.training_job_id,
        dataset_files=[file_to_proto(f) for f in lin.dataset_files],
        hyper_parameters=lin.hyper_parameters,
        ray_run_name=lin.ray_run_name,
        code_version=lin.code_version,
    )
    if lin.project_id or lin.dataset_version_id or lin.dataset_manifest is not None:
        out.dataset_version.CopyFrom(dataset_ref_to_proto(lin))
    base = lin.base_model
    if base is not None:
        ref = common_pb2.BaseModelRef(content_sha256=base.content_sha256)
        if base.base_model_name:
            ref.base_model_name = base.base_model_name
        elif base.object_prefix:
            ref.object_prefix = base.object_prefix
        elif base.local_path:
            ref.local_path = base.local_path
        out.base_model.CopyFrom(ref)
    return out


# ------------------------------------------------------------------------------------------ registry messages


def model_to_proto(m: RegisteredModel) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=m.name,
        organization_id=m.organization_id,
        description=m.description,
        task=task_to_proto(m.task),
        label_map=common_pb2.LabelMap(labels=list(m.label_map)),
        tags=m.tags,
        aliases=m.aliases,
        latest_version=m.latest_version,
        created_by=m.created_by,
        create_time=timestamp(m.create_time),
        update_time=timestamp(m.update_time),
    )


def version_to_proto(v: ModelVersion) -> pb.ModelVersion:
    out = pb.ModelVersion(
        registered_model_name=v.model_name,
        version=v.version,
        status=status_to_proto(v.status),
        status_reason=v.status_reason,
        artifact_prefix=v.artifact_prefix,
        files=[file_to_proto(f) for f in v.files],
        signature=signature_to_proto(v.signature),
        task=task_to_proto(v.task),
        label_map=common_pb2.LabelMap(labels=list(v.label_map)),
        metrics=[metric_to_proto(m) for m in v.metrics],
        lineage=lineage_to_proto(v.lineage),
        aliases=list(v.aliases),
        description=v.description,
        tags=v.tags,
        created_by=v.created_by,
        create_time=timestamp(v.create_time),
        update_time=timestamp(v.update_time),
        rolled_back_reason=v.rolled_back_reason,
    )
    if v.manifest is not None:
        out.manifest.CopyFrom(file_to_proto(v.manifest))
    return out


def decision_to_proto(d: PromotionDecision) -> pb.PromotionDecision:
    out = pb.PromotionDecision(
        metric_name=d.metric_name,
        split=split_to_proto(d.split),
        candidate_version=d.candidate_version,
        candidate_value=d.candidate_value,
        min_improvement=d.min_improvement,
        passed=d.passed,
        explanation=d.explanation,
    )
    if d.baseline_version is not None:
        out.baseline_version = d.baseline_version
    if d.baseline_value is not None:
        out.baseline_value = d.baseline_value
    if d.online is not None:
        o = d.online
        out.online.CopyFrom(
            pb.OnlineComparison(
                test=pb.OnlineTest.Value(f"ONLINE_TEST_{o.test.value}"),
                candidate_positive=o.candidate_positive,
                candidate_negative=o.candidate_negative,
                baseline_positive=o.baseline_positive,
                baseline_negative=o.baseline_negative,
                z=o.z,
                p_value=o.p_value,
                alpha=o.alpha,
                max_rate_drop=o.max_rate_drop,
                candidate_succeeded=o.candidate_succeeded,
                candidate_failed=o.candidate_failed,
                baseline_succeeded=o.baseline_succeeded,
                baseline_failed=o.baseline_failed,
                error_p_value=o.error_p_value,
                max_error_rate_increase=o.max_error_rate_increase,
            )
        )
    return out


def change_to_proto(c: AliasChange) -> pb.AliasChange:
    out = pb.AliasChange(
        registered_model_name=c.model_name,
        alias=c.alias,
        sequence=c.sequence,
        actor=c.actor,
        reason=c.reason,
        cause=cause_to_proto(c.cause),
        change_time=timestamp(c.change_time),
    )
    if c.from_version is not None:
        out.from_version = c.from_version
    if c.to_version is not None:
        out.to_version = c.to_version
    if c.decision is not None:
        out.decision.CopyFrom(decision_to_proto(c.decision))
    return out


def policy_from_proto(p: pb.PromotionPolicy) -> PromotionPolicy:
    goal = _enum_name(common_pb2.MetricGoal, p.goal, "goal")
    mode = _enum_name(pb.PromotionMode, p.mode, "mode")
    split = split_from_proto(p.split) or "test"  # UNSPECIFIED means TEST for policies
    return PromotionPolicy(
        model_name=p.registered_model_name,
        enabled=p.enabled,
        target_alias=p.target_alias,
        metric_name=p.metric_name,
        split=split,
        goal=MetricGoal.MINIMIZE if goal == "METRIC_GOAL_MINIMIZE" else MetricGoal.MAXIMIZE,
        baseline_alias=p.baseline_alias,
        min_improvement=p.min_improvement,
        min_value=p.min_value if p.HasField("min_value") else None,
        mode=PromotionMode.MANUAL_APPROVAL if mode == "PROMOTION_MODE_MANUAL_APPROVAL" else PromotionMode.AUTOMATIC,
        online_gate=online_gate_from_proto(p.online_gate) if p.HasField("online_gate") else None,
        # UNSPECIFIED means TEST, as for the policy's own metric.
        min_metrics=tuple(Metric(m.name, m.value, split_from_proto(m.split) or "test") for m in p.min_metrics),
    )


def online_gate_from_proto(g: pb.OnlineGate) -> OnlineGate:
    test = _enum_name(pb.OnlineTest, g.test, "online_gate.test")
    return OnlineGate(
        enabled=g.enabled,
        min_feedback=g.min_feedback,
        test=OnlineTest.POINT_ESTIMATE if test == "ONLINE_TEST_POINT_ESTIMATE" else OnlineTest.TWO_PROPORTION_Z,
        alpha=g.alpha or DEFAULT_ALPHA,
        max_rate_drop=g.max_rate_drop,
        max_error_rate_increase=g.max_error_rate_increase,
    )


def policy_to_proto(p: PromotionPolicy) -> pb.PromotionPolicy:
    out = pb.PromotionPolicy(
        registered_model_name=p.model_name,
        enabled=p.enabled,
        target_alias=p.target_alias,
        metric_name=p.metric_name,
        split=split_to_proto(p.split),
        goal=common_pb2.MetricGoal.Value(f"METRIC_GOAL_{p.goal.value}"),
        baseline_alias=p.baseline_alias,
        min_improvement=p.min_improvement,
        mode=pb.PromotionMode.Value(f"PROMOTION_MODE_{p.mode.value}"),
        update_time=timestamp(p.update_time),
    )
    if p.min_value is not None:
        out.min_value = p.min_value
    if p.online_gate is not None:
        g = p.online_gate
        out.online_gate.CopyFrom(
            pb.OnlineGate(
                enabled=g.enabled,
                min_feedback=g.min_feedback,
                test=pb.OnlineTest.Value(f"ONLINE_TEST_{g.test.value}"),
                alpha=g.alpha,
                max_rate_drop=g.max_rate_drop,
                max_error_rate_increase=g.max_error_rate_increase,
            )
        )
    out.min_metrics.extend(metric_to_proto(m) for m in p.min_metrics)
    return out


def promotion_to_proto(p: PendingPromotion) -> pb.PendingPromotion:
    out = pb.PendingPromotion(
        promotion_id=p.promotion_id,
        registered_model_name=p.model_name,
        target_alias=p.target_alias,
        version=p.version,
        decision=decision_to_proto(p.decision),
        state=pb.PendingPromotionState.Value(f"PENDING_PROMOTION_STATE_{p.state.value}"),
        decided_by=p.decided_by,
        decision_reason=p.decision_reason,
        create_time=timestamp(p.create_time),
    )
    if p.from_version is not None:
        out.from_version = p.from_version
    if p.decide_time is not None:
        out.decide_time.CopyFrom(timestamp(p.decide_time))
    return out


def card_to_proto(c: ModelCard) -> pb.ModelCard:
    out = pb.ModelCard(
        registered_model_name=c.model_name,
        version=c.version,
        revision=c.revision,
        intended_use=c.text.intended_use,
        limitations=c.text.limitations,
        ethical_considerations=c.text.ethical_considerations,
        training_summary=c.training_summary,
        metrics=[metric_to_proto(m) for m in c.metrics],
        markdown=c.markdown,
        updated_by=c.updated_by,
        update_time=timestamp(c.update_time),
    )
    if c.object is not None:
        out.object.CopyFrom(file_to_proto(c.object))
    return out


def card_text_from_proto(c: pb.ModelCard) -> CardText:
    return CardText(c.intended_use, c.limitations, c.ethical_considerations)


def base_model_to_proto(b: BaseModel) -> pb.BaseModel:
    return pb.BaseModel(
        name=b.name,
        organization_id=b.organization_id,
        model_type=b.model_type,
        architectures=list(b.architectures),
        tasks=[task_to_proto(t) for t in b.tasks],
        parameter_count=b.parameter_count,
        license=b.license,
        description=b.description,
        artifact_prefix=b.artifact_prefix,
        files=[file_to_proto(f) for f in b.files],
        content_sha256=b.content_sha256,
        create_time=timestamp(b.create_time),
        chat_template_sha256=b.chat_template_sha256,
    )


def metric_filter_from_proto(f: pb.MetricFilter) -> MetricFilter:
    name = _enum_name(pb.Comparison, f.comparison, "comparison")
    if name == "COMPARISON_UNSPECIFIED":
        raise InvalidArgumentError(f"metric filter on {f.metric_name!r} needs a comparison (e.g. GREATER_OR_EQUAL)")
    if f.value != f.value:
        raise InvalidArgumentError(f"metric filter on {f.metric_name!r} compares with NaN")
    return MetricFilter(f.metric_name, split_from_proto(f.split), Comparison(name.removeprefix("COMPARISON_")), f.value)


def selector(sel: common_pb2.ModelVersionSelector) -> tuple[int | None, str | None]:
    """(version, alias): at most one is set; both None means "latest READY"."""
    which = sel.WhichOneof("selector")
    if which == "version":
        return sel.version, None
    if which == "alias":
        return None, sel.alias
    return None, None
