"""A training job's spec from ``train``'s options, over an optional ``--spec-file`` (the ``JobSpec`` message's JSON,
as ``jobs show JOB --spec`` prints it): options given on the command line win over the file's fields."""

from __future__ import annotations

from pathlib import Path

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.options import message_from_json_file
from gristmill.cli.output import fail

# --objective's names: the dataset version's task type picks one when none is given.
OBJECTIVES = {"classify": tr.OBJECTIVE_CLASSIFY, "sft": tr.OBJECTIVE_SFT, "dpo": tr.OBJECTIVE_DPO}
DPO_LOSSES = {"sigmoid": tr.DPO_LOSS_SIGMOID, "ipo": tr.DPO_LOSS_IPO, "hinge": tr.DPO_LOSS_HINGE}


def spec_from_file(path: Path) -> tr.JobSpec:
    """The ``JobSpec`` in ``path`` (protobuf JSON); a missing or unreadable file is a one-line usage error."""
    return message_from_json_file(path, tr.JobSpec(), what="a job spec", option="--spec-file")


def job_spec(
    *,
    project_id: str,
    dataset_version_id: str,
    base_model: str = "",
    base_model_prefix: str = "",
    base_model_name: str = "",
    model: str = "",
    display_name: str = "",
    epochs: int = 0,
    learning_rate: float = 0.0,
    batch_size: int = 0,
    max_steps: int = 0,
    max_length: int = 0,
    log_every_steps: int = 0,
    lora: bool | None = None,
    qlora: bool = False,
    ia3: bool = False,
    objective: str = "",
    chat_template: str = "",
    beta: float = 0.0,
    dpo_loss: str = "",
    merged: bool = False,
    workers: int = 0,
    fsdp: bool = False,
    gradient_checkpointing: bool = False,
    augment: int = 0,
    adversarial: float = 0.0,
    paraphrase: int = 0,
    paraphrase_model: str = "",
    prune_layers: int = 0,
    prune_embedding_size: int = 0,
    prune_intermediate_size: int = 0,
    teacher_prefix: str = "",
    distil_temperature: float = 0.0,
    distil_weight: float | None = None,
    base: tr.JobSpec | None = None,
) -> tr.JobSpec:
    """A job spec: ``base`` (a ``--spec-file``'s) with the options given laid over it. Zero values (and ``lora``
    None) leave the base's field; what neither sets keeps the service's documented default."""
    spec = tr.JobSpec()
    if base is not None:
        spec.CopyFrom(base)
    given = [bool(base_model), bool(base_model_prefix), bool(base_model_name)]
    if sum(given) > 1 or (not any(given) and spec.base_model.WhichOneof("source") is None):
        fail(
            "give exactly one of --base-model (a local directory), --base-model-prefix, --base-model-name or "
            "--base-model-version (or base_model in --spec-file)",
            code=2,
        )
    if base_model:
        spec.base_model.CopyFrom(common_pb2.BaseModelRef(local_path=base_model))
    elif base_model_prefix:
        spec.base_model.CopyFrom(common_pb2.BaseModelRef(object_prefix=base_model_prefix))
    elif base_model_name:
        spec.base_model.CopyFrom(common_pb2.BaseModelRef(base_model_name=base_model_name))
    spec.dataset_version.project_id = project_id
    if dataset_version_id:
        spec.dataset_version.dataset_version_id = dataset_version_id
    spec.display_name = display_name or spec.display_name or f"{project_id} fine-tune"
    if qlora and lora is False:
        fail("--qlora trains LoRA adapters over a 4-bit base; it cannot be combined with --full", code=2)
    if ia3 and (qlora or lora is not None):
        fail("--ia3 is a method of its own: leave out --lora, --full and --qlora", code=2)
    if ia3:
        spec.method = tr.TRAINING_METHOD_IA3
    elif qlora:
        spec.method = tr.TRAINING_METHOD_QLORA
    elif lora is not None:
        spec.method = tr.TRAINING_METHOD_LORA if lora else tr.TRAINING_METHOD_FULL
    elif spec.method == tr.TRAINING_METHOD_UNSPECIFIED:
        spec.method = tr.TRAINING_METHOD_FULL
    if objective:
        if objective not in OBJECTIVES:
            fail(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}", code=2)
        spec.objective = OBJECTIVES[objective]
    spec.chat_template = chat_template or spec.chat_template
    if beta:
        spec.dpo.beta = beta
    if dpo_loss:
        if dpo_loss not in DPO_LOSSES:
            fail(f"--dpo-loss must be one of {', '.join(DPO_LOSSES)}, got {dpo_loss!r}", code=2)
        spec.dpo.loss = DPO_LOSSES[dpo_loss]
    spec.publish_merged = merged or spec.publish_merged
    hp = spec.hyper_parameters
    hp.learning_rate = learning_rate or hp.learning_rate
    hp.per_worker_batch_size = batch_size or hp.per_worker_batch_size
    hp.epochs = epochs or hp.epochs
    hp.max_sequence_length = max_length or hp.max_sequence_length
    hp.log_every_steps = log_every_steps or hp.log_every_steps
    if max_steps:
        hp.max_steps = max_steps
    if augment:
        hp.few_labels.augmentation_copies = augment
    if adversarial:
        hp.few_labels.adversarial_epsilon = adversarial
    if paraphrase:
        hp.few_labels.paraphrase_copies = paraphrase
    if paraphrase_model:
        hp.few_labels.paraphrase_model.CopyFrom(common_pb2.BaseModelRef(base_model_name=paraphrase_model))
    if prune_layers:
        spec.pruning.layers = prune_layers
    if prune_embedding_size:
        spec.pruning.embedding_size = prune_embedding_size
    if prune_intermediate_size:
        spec.pruning.intermediate_size = prune_intermediate_size
    if teacher_prefix:
        spec.distillation.teacher.CopyFrom(common_pb2.BaseModelRef(object_prefix=teacher_prefix))
    if distil_temperature:
        spec.distillation.temperature = distil_temperature
    if distil_weight is not None:
        spec.distillation.weight = distil_weight
    spec.resources.num_workers = workers or spec.resources.num_workers or 1
    spec.resources.fsdp = fsdp or spec.resources.fsdp
    hp.gradient_checkpointing = gradient_checkpointing or hp.gradient_checkpointing
    spec.registered_model_name = model or spec.registered_model_name
    return spec
