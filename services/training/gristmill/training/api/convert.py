"""Protobuf <-> domain conversions for the training API (and the payloads of its events).

Reading a request applies no rules of its own: raw values (0 / unset) go to the domain's ``build_*``
functions, which fill in defaults and refuse bad values naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.errors import InvalidArgumentError
from gristmill.training.domain import spec as d
from gristmill.training.domain.model import (
    AutoTrainPolicy,
    EventKind,
    Job,
    JobEvent,
    JobProgress,
    JobResult,
    JobState,
    Lineage,
    Metric,
    Signature,
    Split,
)
from gristmill.training.domain.refs import BaseModelRef, DatasetRef, FileRef

T = TypeVar("T")

# --------------------------------------------------------------------------- enums

_STATE_TO_PB = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_SPLIT_TO_PB = {
    Split.NONE: common_pb2.DATASET_SPLIT_UNSPECIFIED,
    Split.TRAIN: common_pb2.DATASET_SPLIT_TRAIN,
    Split.VALIDATION: common_pb2.DATASET_SPLIT_VALIDATION,
    Split.TEST: common_pb2.DATASET_SPLIT_TEST,
}
_METHOD_FROM_PB = {
    pb.TRAINING_METHOD_UNSPECIFIED: d.Method.FULL,
    pb.TRAINING_METHOD_FULL: d.Method.FULL,
    pb.TRAINING_METHOD_LORA: d.Method.LORA,
    pb.TRAINING_METHOD_QLORA: d.Method.QLORA,
    pb.TRAINING_METHOD_IA3: d.Method.IA3,
}
_METHOD_TO_PB = {
    d.Method.FULL: pb.TRAINING_METHOD_FULL,
    d.Method.LORA: pb.TRAINING_METHOD_LORA,
    d.Method.QLORA: pb.TRAINING_METHOD_QLORA,
    d.Method.IA3: pb.TRAINING_METHOD_IA3,
}
_OBJECTIVE_FROM_PB = {
    pb.OBJECTIVE_UNSPECIFIED: None,
    pb.OBJECTIVE_CLASSIFY: d.Objective.CLASSIFY,
    pb.OBJECTIVE_SFT: d.Objective.SFT,
    pb.OBJECTIVE_DPO: d.Objective.DPO,
}
_OBJECTIVE_TO_PB = {v: k for k, v in _OBJECTIVE_FROM_PB.items() if v is not None}
_DPO_LOSS_FROM_PB = {
    pb.DPO_LOSS_UNSPECIFIED: None,
    pb.DPO_LOSS_SIGMOID: d.DpoLoss.SIGMOID,
    pb.DPO_LOSS_IPO: d.DpoLoss.IPO,
    pb.DPO_LOSS_HINGE: d.DpoLoss.HINGE,
}
_DPO_LOSS_TO_PB = {v: k for k, v in _DPO_LOSS_FROM_PB.items() if v is not None}
_PRECISION_FROM_PB = {
    pb.MIXED_PRECISION_UNSPECIFIED: d.Precision.AUTO,
    pb.MIXED_PRECISION_NO: d.Precision.NO,
    pb.MIXED_PRECISION_BF16: d.Precision.BF16,
    pb.MIXED_PRECISION_FP16: d.Precision.FP16,
}
_PRECISION_TO_PB = {v: k for k, v in _PRECISION_FROM_PB.items()}
_SCHEDULE_FROM_PB = {
    pb.LEARNING_RATE_SCHEDULE_UNSPECIFIED: None,
    pb.LEARNING_RATE_SCHEDULE_LINEAR: d.Schedule.LINEAR,
    pb.LEARNING_RATE_SCHEDULE_COSINE: d.Schedule.COSINE,
    pb.LEARNING_RATE_SCHEDULE_CONSTANT: d.Schedule.CONSTANT,
}
_SCHEDULE_TO_PB = {v: k for k, v in _SCHEDULE_FROM_PB.items() if v is not None}
_GOAL_FROM_PB = {
    common_pb2.METRIC_GOAL_UNSPECIFIED: None,
    common_pb2.METRIC_GOAL_MAXIMIZE: d.Goal.MAXIMIZE,
    common_pb2.METRIC_GOAL_MINIMIZE: d.Goal.MINIMIZE,
}
_GOAL_TO_PB = {v: k for k, v in _GOAL_FROM_PB.items() if v is not None}
_SCHEDULER_FROM_PB = {
    pb.SEARCH_SCHEDULER_UNSPECIFIED: None,
    pb.SEARCH_SCHEDULER_ASHA: d.Scheduler.ASHA,
    pb.SEARCH_SCHEDULER_FIFO: d.Scheduler.FIFO,
}
_SCHEDULER_TO_PB = {v: k for k, v in _SCHEDULER_FROM_PB.items() if v is not None}


def _enum(table: Mapping[Any, T], value: int, field: str) -> T:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgumentError(f"{field} has an unknown value {value}", details={"field": field}) from None


def state_from_proto(value: int, field: str = "states") -> JobState:
    if value == pb.JOB_STATE_UNSPECIFIED:
        raise InvalidArgumentError(f"{field} must not contain JOB_STATE_UNSPECIFIED", details={"field": field})
    return _enum(_STATE_FROM_PB, value, field)


def state_to_proto(state: JobState | None) -> pb.JobState.ValueType:
    return pb.JOB_STATE_UNSPECIFIED if state is None else _STATE_TO_PB[state]


def task_from_proto(value: int, field: str = "spec.task") -> d.TaskType:
    try:
        return d.TaskType(common_pb2.TaskType.Name(value))  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgumentError(f"{field} has an unknown value {value}", details={"field": field}) from None


def task_to_proto(task: d.TaskType) -> common_pb2.TaskType.ValueType:
    return common_pb2.TaskType.Value(task.value)


# --------------------------------------------------------------------------- spec: proto -> domain


def base_model_from_proto(ref: common_pb2.BaseModelRef, field_name: str = "base_model") -> BaseModelRef:
    which = ref.WhichOneof("source")
    return d.build_base_model(
        name=ref.base_model_name if which == "base_model_name" else "",
        object_prefix=ref.object_prefix if which == "object_prefix" else "",
        local_path=ref.local_path if which == "local_path" else "",
        field_name=field_name,
    )


def dataset_from_proto(ref: common_pb2.DatasetVersionRef, field_name: str = "dataset_version") -> DatasetRef:
    """A dataset version reference, with the manifest's checksum when it names one (a resolved spec's)."""
    dataset = d.build_dataset(
        project_id=ref.project_id, dataset_version_id=ref.dataset_version_id, field_name=field_name
    )
    if ref.HasField("manifest") and ref.manifest.key:
        m = ref.manifest
        dataset = DatasetRef(
            dataset.project_id, dataset.dataset_version_id, FileRef(m.key, m.sha256.lower(), m.size_bytes)
        )
    return dataset


def spec_from_proto(spec: pb.JobSpec, *, require_dataset: bool = True) -> d.JobSpec:
    method = _enum(_METHOD_FROM_PB, spec.method, "spec.method")
    base = base_model_from_proto(spec.base_model)
    if require_dataset:
        dataset = dataset_from_proto(spec.dataset_version)
    else:
        dataset = DatasetRef(project_id="", dataset_version_id="")
    lora = d.build_lora(
        method=method,
        given=spec.HasField("lora"),
        rank=spec.lora.rank,
        alpha=spec.lora.alpha,
        dropout=spec.lora.dropout if spec.lora.HasField("dropout") else None,
        target_modules=list(spec.lora.target_modules),
    )
    hp = spec.hyper_parameters
    es = hp.early_stopping
    goal = _enum(_GOAL_FROM_PB, es.goal, "spec.hyper_parameters.early_stopping.goal")
    schedule = _enum(_SCHEDULE_FROM_PB, hp.learning_rate_schedule, "spec.hyper_parameters.learning_rate_schedule")
    precision = _enum(_PRECISION_FROM_PB, hp.mixed_precision, "spec.hyper_parameters.mixed_precision")
    hyper = d.build_hyper_parameters(
        method=method,
        learning_rate=hp.learning_rate,
        per_worker_batch_size=hp.per_worker_batch_size,
        epochs=hp.epochs,
        max_steps=hp.max_steps if hp.HasField("max_steps") else None,
        warmup_ratio=hp.warmup_ratio if hp.HasField("warmup_ratio") else None,
        weight_decay=hp.weight_decay if hp.HasField("weight_decay") else None,
        schedule=schedule,
        max_sequence_length=hp.max_sequence_length,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        gradient_checkpointing=hp.gradient_checkpointing,
        mixed_precision=precision,
        seed=hp.seed if hp.HasField("seed") else None,
        eval_every_steps=hp.eval_every_steps,
        log_every_steps=hp.log_every_steps,
        early_stopping=d.build_early_stopping(
            patience=es.patience,
            metric=es.metric,
            goal=goal,
            min_delta=es.min_delta,
        ),
        few_labels=d.build_few_labels(
            augmentation_copies=hp.few_labels.augmentation_copies,
            augmentation_probability=(
                hp.few_labels.augmentation_probability if hp.few_labels.HasField("augmentation_probability") else None
            ),
            adversarial_epsilon=hp.few_labels.adversarial_epsilon,
            paraphrase_copies=hp.few_labels.paraphrase_copies,
            paraphrase_model=(
                base_model_from_proto(hp.few_labels.paraphrase_model, "hyper_parameters.few_labels.paraphrase_model")
                if hp.few_labels.HasField("paraphrase_model")
                else None
            ),
        ),
    )
    res = spec.resources
    resources = d.build_resources(
        num_workers=res.num_workers,
        use_gpu=res.use_gpu,
        cpus_per_worker=res.cpus_per_worker,
        gpus_per_worker=res.gpus_per_worker,
        max_failures=res.max_failures if res.HasField("max_failures") else None,
        fsdp=res.fsdp,
    )
    search = _search_from_proto(spec.search, method) if spec.HasField("search") else None
    return d.build_spec(
        display_name=spec.display_name,
        base_model=base,
        dataset=dataset,
        task=task_from_proto(spec.task),
        method=method,
        lora=lora,
        hyper_parameters=hyper,
        resources=resources,
        search=search,
        registered_model_name=spec.registered_model_name,
        tags=dict(spec.tags),
        objective=_enum(_OBJECTIVE_FROM_PB, spec.objective, "spec.objective"),
        chat_template=spec.chat_template,
        publish_merged=spec.publish_merged,
        dpo=d.build_dpo(
            given=spec.HasField("dpo"),
            beta=spec.dpo.beta,
            loss=_enum(_DPO_LOSS_FROM_PB, spec.dpo.loss, "spec.dpo.loss"),
        ),
        json_match_keys=d.build_json_match_keys(list(spec.json_match_keys)),
        pruning=d.build_pruning(
            given=spec.HasField("pruning"),
            layers=spec.pruning.layers,
            embedding_size=spec.pruning.embedding_size,
            intermediate_size=spec.pruning.intermediate_size,
        ),
        distillation=d.build_distillation(
            given=spec.HasField("distillation"),
            teacher=(
                base_model_from_proto(spec.distillation.teacher, "distillation.teacher")
                if spec.distillation.HasField("teacher")
                else None
            ),
            temperature=spec.distillation.temperature,
            weight=spec.distillation.weight if spec.distillation.HasField("weight") else None,
            hidden_weight=spec.distillation.hidden_weight if spec.distillation.HasField("hidden_weight") else None,
        ),
        evaluation_dataset=(
            dataset_from_proto(spec.evaluation_dataset_version, "evaluation_dataset_version")
            if spec.HasField("evaluation_dataset_version")
            else None
        ),
    )


def _search_from_proto(search: pb.HyperParameterSearch, method: d.Method) -> d.SearchSettings:
    dims = []
    for i, dim in enumerate(search.dimensions):
        which = dim.WhichOneof("domain")
        if which == "uniform":
            dims.append(
                d.build_search_dimension(
                    i,
                    parameter=dim.parameter,
                    distribution=d.Distribution.UNIFORM,
                    low=dim.uniform.min,
                    high=dim.uniform.max,
                    method=method,
                )
            )
        elif which == "log_uniform":
            dims.append(
                d.build_search_dimension(
                    i,
                    parameter=dim.parameter,
                    distribution=d.Distribution.LOG_UNIFORM,
                    low=dim.log_uniform.min,
                    high=dim.log_uniform.max,
                    method=method,
                )
            )
        else:
            dims.append(
                d.build_search_dimension(
                    i,
                    parameter=dim.parameter,
                    distribution=d.Distribution.CHOICE if which == "choice" else None,
                    values=list(dim.choice.values),
                    method=method,
                )
            )
    goal = _enum(_GOAL_FROM_PB, search.goal, "spec.search.goal")
    scheduler = _enum(_SCHEDULER_FROM_PB, search.scheduler, "spec.search.scheduler")
    return d.build_search(
        num_trials=search.num_trials,
        max_concurrent_trials=search.max_concurrent_trials,
        metric=search.metric,
        goal=goal,
        scheduler=scheduler,
        dimensions=dims,
    )


# --------------------------------------------------------------------------- domain -> proto


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def file_ref_to_proto(ref: FileRef) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)


def base_model_to_proto(ref: BaseModelRef) -> common_pb2.BaseModelRef:
    out = common_pb2.BaseModelRef(content_sha256=ref.content_sha256)
    if ref.name:
        out.base_model_name = ref.name
    elif ref.object_prefix:
        out.object_prefix = ref.object_prefix
    elif ref.local_path:
        out.local_path = ref.local_path
    return out


def dataset_to_proto(ref: DatasetRef) -> common_pb2.DatasetVersionRef:
    out = common_pb2.DatasetVersionRef(project_id=ref.project_id, dataset_version_id=ref.dataset_version_id)
    if ref.manifest is not None:
        out.manifest.CopyFrom(file_ref_to_proto(ref.manifest))
    return out


def few_labels_to_proto(few: d.FewLabels) -> pb.FewLabels:
    out = pb.FewLabels(augmentation_copies=few.augmentation_copies, adversarial_epsilon=few.adversarial_epsilon)
    if few.augmentation_copies:
        out.augmentation_probability = few.augmentation_probability
    out.paraphrase_copies = few.paraphrase_copies
    if few.paraphrase_model is not None:
        out.paraphrase_model.CopyFrom(base_model_to_proto(few.paraphrase_model))
    return out


def spec_to_proto(spec: d.JobSpec) -> pb.JobSpec:
    hp = spec.hyper_parameters
    es = hp.early_stopping
    out = pb.JobSpec(
        display_name=spec.display_name,
        base_model=base_model_to_proto(spec.base_model),
        task=task_to_proto(spec.task),
        method=_METHOD_TO_PB[spec.method],
        hyper_parameters=pb.HyperParameters(
            learning_rate=hp.learning_rate,
            per_worker_batch_size=hp.per_worker_batch_size,
            epochs=hp.epochs,
            warmup_ratio=hp.warmup_ratio,
            weight_decay=hp.weight_decay,
            learning_rate_schedule=_SCHEDULE_TO_PB[hp.schedule],
            max_sequence_length=hp.max_sequence_length,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            gradient_checkpointing=hp.gradient_checkpointing,
            mixed_precision=_PRECISION_TO_PB[hp.mixed_precision],
            seed=hp.seed,
            eval_every_steps=hp.eval_every_steps,
            log_every_steps=hp.log_every_steps,
            early_stopping=pb.EarlyStopping(
                patience=es.patience, metric=es.metric, goal=_GOAL_TO_PB[es.goal], min_delta=es.min_delta
            ),
            few_labels=few_labels_to_proto(hp.few_labels),
        ),
        resources=pb.Resources(
            num_workers=spec.resources.num_workers,
            use_gpu=spec.resources.use_gpu,
            cpus_per_worker=spec.resources.cpus_per_worker,
            gpus_per_worker=spec.resources.gpus_per_worker,
            max_failures=spec.resources.max_failures,
            fsdp=spec.resources.fsdp,
        ),
        registered_model_name=spec.registered_model_name,
        tags=spec.tags,
        objective=pb.OBJECTIVE_UNSPECIFIED if spec.objective is None else _OBJECTIVE_TO_PB[spec.objective],
        chat_template=spec.chat_template,
        publish_merged=spec.publish_merged,
        json_match_keys=list(spec.json_match_keys),
    )
    if spec.dataset.project_id:
        out.dataset_version.CopyFrom(dataset_to_proto(spec.dataset))
    if spec.evaluation_dataset is not None:
        out.evaluation_dataset_version.CopyFrom(dataset_to_proto(spec.evaluation_dataset))
    if hp.max_steps is not None:
        out.hyper_parameters.max_steps = hp.max_steps
    if spec.lora is not None:
        out.lora.CopyFrom(
            pb.LoraConfig(
                rank=spec.lora.rank,
                alpha=spec.lora.alpha,
                dropout=spec.lora.dropout,
                target_modules=list(spec.lora.target_modules),
            )
        )
    if spec.dpo is not None:
        out.dpo.CopyFrom(pb.DpoConfig(beta=spec.dpo.beta, loss=_DPO_LOSS_TO_PB[spec.dpo.loss]))
    if spec.pruning is not None:
        cut = spec.pruning
        out.pruning.CopyFrom(
            pb.Pruning(layers=cut.layers, embedding_size=cut.embedding_size, intermediate_size=cut.intermediate_size)
        )
    if spec.distillation is not None:
        out.distillation.CopyFrom(
            pb.Distillation(
                teacher=base_model_to_proto(spec.distillation.teacher),
                temperature=spec.distillation.temperature,
                weight=spec.distillation.weight,
                hidden_weight=spec.distillation.hidden_weight,
            )
        )
    if spec.search is not None:
        s = spec.search
        search = pb.HyperParameterSearch(
            num_trials=s.num_trials,
            max_concurrent_trials=s.max_concurrent_trials,
            metric=s.metric,
            goal=_GOAL_TO_PB[s.goal],
            scheduler=_SCHEDULER_TO_PB[s.scheduler],
        )
        for dim in s.dimensions:
            item = search.dimensions.add(parameter=dim.parameter)
            if dim.distribution is d.Distribution.UNIFORM:
                item.uniform.CopyFrom(pb.Range(min=dim.low, max=dim.high))
            elif dim.distribution is d.Distribution.LOG_UNIFORM:
                item.log_uniform.CopyFrom(pb.Range(min=dim.low, max=dim.high))
            else:
                item.choice.CopyFrom(pb.Choice(values=list(dim.values)))
        out.search.CopyFrom(search)
    return out


def metric_to_proto(metric: Metric) -> common_pb2.Metric:
    out = common_pb2.Metric(name=metric.name, value=metric.value, split=_SPLIT_TO_PB[metric.split])
    if metric.step is not None:
        out.step = metric.step
    return out


def progress_to_proto(progress: JobProgress) -> pb.JobProgress:
    return pb.JobProgress(
        step=progress.step,
        total_steps=progress.total_steps,
        epoch=progress.epoch,
        samples_per_second=progress.samples_per_second,
        tokens_per_second=progress.tokens_per_second,
        trials_completed=progress.trials_completed,
        trials_total=progress.trials_total,
    )


def signature_to_proto(signature: Signature) -> common_pb2.ModelSignature:
    return common_pb2.ModelSignature(
        inputs=[common_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in signature.inputs],
        outputs=[
            common_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in signature.outputs
        ],
    )


def lineage_to_proto(lineage: Lineage) -> common_pb2.Lineage:
    return common_pb2.Lineage(
        training_job_id=lineage.training_job_id,
        dataset_version=dataset_to_proto(lineage.dataset),
        dataset_files=[file_ref_to_proto(f) for f in lineage.dataset_files],
        base_model=base_model_to_proto(lineage.base_model),
        hyper_parameters=lineage.hyper_parameters,
        ray_run_name=lineage.ray_run_name,
        code_version=lineage.code_version,
    )


def label_map_to_proto(labels: tuple[str, ...]) -> common_pb2.LabelMap:
    return common_pb2.LabelMap(labels=list(labels))


def result_to_proto(result: JobResult) -> pb.JobResult:
    out = pb.JobResult(
        artifact_prefix=result.artifact_prefix,
        files=[file_ref_to_proto(f) for f in result.files],
        manifest=file_ref_to_proto(result.manifest),
        metrics=[metric_to_proto(m) for m in result.metrics],
        signature=signature_to_proto(result.signature),
        label_map=label_map_to_proto(result.label_map),
        lineage=lineage_to_proto(result.lineage),
        trainable_parameter_count=result.trainable_parameter_count,
        total_parameter_count=result.total_parameter_count,
    )
    if result.best_trial is not None:
        out.best_trial = result.best_trial
    return out


def job_to_proto(job: Job) -> pb.Job:
    out = pb.Job(
        job_id=job.job_id,
        organization_id=job.organization_id,
        spec=spec_to_proto(job.spec),
        state=state_to_proto(job.state),
        state_reason=job.state_reason,
        progress=progress_to_proto(job.progress),
        latest_metrics=[metric_to_proto(m) for m in job.latest_metrics],
        ray_run_name=job.ray_run_name,
        restart_count=job.restart_count,
        create_time=timestamp(job.create_time),
        start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time),
    )
    if job.trigger.auto_train_dataset_version_id:
        out.trigger.auto_train_dataset_version_id = job.trigger.auto_train_dataset_version_id
    else:
        out.trigger.api_key_id = job.trigger.api_key_id
    if job.result is not None:
        out.result.CopyFrom(result_to_proto(job.result))
    return out


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    out = pb.JobEvent(job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time))
    if event.kind is EventKind.STATE:
        transition = pb.JobStateTransition(state=state_to_proto(event.state), reason=event.reason)
        if event.progress is not None:
            transition.progress.CopyFrom(progress_to_proto(event.progress))
        if event.result is not None:
            transition.result.CopyFrom(result_to_proto(event.result))
        out.state_change.CopyFrom(transition)
    else:
        report = pb.MetricsReport(
            step=event.step, epoch=event.epoch, metrics=[metric_to_proto(m) for m in event.metrics]
        )
        if event.trial is not None:
            report.trial = event.trial
        out.metrics.CopyFrom(report)
    return out


def policy_to_proto(policy: AutoTrainPolicy) -> pb.AutoTrainPolicy:
    return pb.AutoTrainPolicy(
        project_id=policy.project_id,
        enabled=policy.enabled,
        job_template=spec_to_proto(policy.job_template),
        update_time=timestamp(policy.update_time),
    )
