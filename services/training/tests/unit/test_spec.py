"""Job specs: documented defaults, refusals naming the field, and the proto <-> domain round trip."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.serialization import from_plain, to_plain
from gristmill.training.api import convert
from gristmill.training.domain import spec as d
from gristmill.training.domain.model import Job, JobState, Metric, Split
from gristmill.training.domain.objectives import Objective


def _spec(**changes: object) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="sentiment")
    spec.base_model.local_path = "/models/tiny"
    spec.dataset_version.project_id = "reviews"
    spec.dataset_version.dataset_version_id = "v1"
    for path, value in changes.items():
        target = spec
        *parents, leaf = path.split("__")
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)
    return spec


def test_zero_values_mean_the_documented_defaults() -> None:
    spec = convert.spec_from_proto(_spec())
    hp = spec.hyper_parameters
    assert spec.method is d.Method.FULL and spec.lora is None
    assert hp.learning_rate == 2e-5 and hp.per_worker_batch_size == 16 and hp.epochs == 3
    assert hp.warmup_ratio == 0.06 and hp.weight_decay == 0.01 and hp.seed == 42
    assert hp.max_sequence_length == 128 and hp.gradient_accumulation_steps == 1 and hp.log_every_steps == 10
    assert hp.max_steps is None and hp.schedule is d.Schedule.LINEAR and hp.mixed_precision is d.Precision.AUTO
    assert hp.early_stopping == d.EarlyStopping(patience=0, metric="f1", goal=d.Goal.MAXIMIZE)
    assert spec.resources == d.Resources(num_workers=1, use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0)


def test_lora_defaults_depend_on_the_method() -> None:
    spec = convert.spec_from_proto(_spec(method=pb.TRAINING_METHOD_LORA))
    assert spec.lora == d.LoraSettings(rank=8, alpha=16.0, dropout=0.1, target_modules=())
    assert spec.hyper_parameters.learning_rate == 2e-4
    ranked = convert.spec_from_proto(_spec(method=pb.TRAINING_METHOD_LORA, lora__rank=4, lora__dropout=0.0))
    assert ranked.lora is not None and ranked.lora.alpha == 8.0 and ranked.lora.dropout == 0.0


def test_explicit_zero_for_optional_fields_is_kept() -> None:
    spec = convert.spec_from_proto(
        _spec(hyper_parameters__warmup_ratio=0.0, hyper_parameters__weight_decay=0.0, hyper_parameters__seed=0)
    )
    assert (spec.hyper_parameters.warmup_ratio, spec.hyper_parameters.weight_decay, spec.hyper_parameters.seed) == (
        0.0,
        0.0,
        0,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hyper_parameters__learning_rate": -1.0}, "spec.hyper_parameters.learning_rate"),
        ({"hyper_parameters__learning_rate": math.nan}, "spec.hyper_parameters.learning_rate"),
        ({"hyper_parameters__per_worker_batch_size": -4}, "spec.hyper_parameters.per_worker_batch_size"),
        ({"hyper_parameters__epochs": 100000}, "spec.hyper_parameters.epochs"),
        ({"hyper_parameters__max_steps": 0}, "spec.hyper_parameters.max_steps"),
        ({"hyper_parameters__warmup_ratio": 1.0}, "spec.hyper_parameters.warmup_ratio"),
        ({"hyper_parameters__max_sequence_length": 4}, "spec.hyper_parameters.max_sequence_length"),
        ({"hyper_parameters__gradient_accumulation_steps": -1}, "spec.hyper_parameters.gradient_accumulation_steps"),
        ({"hyper_parameters__early_stopping__metric": "bleu"}, "spec.hyper_parameters.early_stopping.metric"),
        ({"hyper_parameters__early_stopping__patience": -1}, "spec.hyper_parameters.early_stopping.patience"),
        ({"hyper_parameters__mixed_precision": pb.MIXED_PRECISION_FP16}, "spec.hyper_parameters.mixed_precision"),
        ({"hyper_parameters__mixed_precision": 42}, "spec.hyper_parameters.mixed_precision"),
        ({"resources__num_workers": -2}, "spec.resources.num_workers"),
        ({"resources__cpus_per_worker": -0.5}, "spec.resources.cpus_per_worker"),
        ({"resources__gpus_per_worker": 1.0}, "spec.resources.gpus_per_worker"),
        ({"resources__max_failures": -1}, "spec.resources.max_failures"),
        ({"lora__rank": 4}, "spec.lora"),
        ({"method": pb.TRAINING_METHOD_LORA, "lora__dropout": 1.0}, "spec.lora.dropout"),
        ({"method": pb.TRAINING_METHOD_LORA, "lora__rank": -1}, "spec.lora.rank"),
        ({"method": 7}, "spec.method"),
        ({"task": common_pb2.TASK_TYPE_CAUSAL_LM}, "spec.task"),
        ({"registered_model_name": "Not A Slug"}, "spec.registered_model_name"),
        ({"dataset_version__project_id": ""}, "spec.dataset_version"),
        ({"dataset_version__dataset_version_id": "../etc"}, "spec.dataset_version.dataset_version_id"),
    ],
)
def test_bad_values_are_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        convert.spec_from_proto(_spec(**changes))
    assert field in caught.value.message


def test_base_model_is_required() -> None:
    spec = _spec()
    spec.ClearField("base_model")
    with pytest.raises(InvalidArgumentError, match="spec.base_model is required"):
        convert.spec_from_proto(spec)


def test_unknown_lora_module_names_and_search_parameters_are_refused() -> None:
    spec = _spec(method=pb.TRAINING_METHOD_LORA)
    spec.lora.target_modules.append("query;rm -rf")
    with pytest.raises(InvalidArgumentError, match="spec.lora.target_modules"):
        convert.spec_from_proto(spec)
    search = _spec()
    search.search.num_trials = 2
    search.search.dimensions.add(parameter="momentum").uniform.CopyFrom(pb.Range(min=0.1, max=0.9))
    with pytest.raises(InvalidArgumentError, match="not a searchable hyper-parameter"):
        convert.spec_from_proto(search)
    lora_rank = _spec()
    lora_rank.search.num_trials = 2
    lora_rank.search.dimensions.add(parameter="lora.rank").choice.values.extend([4, 8])
    with pytest.raises(InvalidArgumentError, match="only be searched with method LORA"):
        convert.spec_from_proto(lora_rank)
    empty = _spec()
    empty.search.num_trials = 2
    with pytest.raises(InvalidArgumentError, match="at least one hyper-parameter"):
        convert.spec_from_proto(empty)
    bad_range = _spec()
    bad_range.search.num_trials = 2
    bad_range.search.dimensions.add(parameter="learning_rate").log_uniform.CopyFrom(pb.Range(min=0.0, max=0.1))
    with pytest.raises(InvalidArgumentError, match="must be > 0 for log_uniform"):
        convert.spec_from_proto(bad_range)


def test_spec_round_trips_through_proto_and_the_store_format() -> None:
    source = _spec(
        method=pb.TRAINING_METHOD_LORA,
        lora__rank=4,
        hyper_parameters__max_steps=50,
        hyper_parameters__learning_rate_schedule=pb.LEARNING_RATE_SCHEDULE_COSINE,
        hyper_parameters__early_stopping__patience=2,
        hyper_parameters__early_stopping__metric="loss",
        registered_model_name="sentiment",
    )
    source.lora.target_modules.extend(["query", "value"])
    source.tags["team"] = "ml"
    source.search.num_trials = 3
    source.search.dimensions.add(parameter="learning_rate").log_uniform.CopyFrom(pb.Range(min=1e-5, max=1e-3))
    source.search.dimensions.add(parameter="lora.rank").choice.values.extend([4, 8])
    spec = convert.spec_from_proto(source)
    assert spec.hyper_parameters.early_stopping.goal is d.Goal.MINIMIZE  # "loss" is minimised by default
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert from_plain(d.JobSpec, to_plain(spec)) == spec
    flat = d.flatten_hyper_parameters(spec)
    assert flat["method"] == "lora" and flat["lora.rank"] == "4" and flat["max_steps"] == "50"
    assert flat["lora.target_modules"] == "query,value" and flat["learning_rate_schedule"] == "cosine"


def test_job_round_trips_through_the_store_format() -> None:
    from datetime import UTC, datetime

    spec = convert.spec_from_proto(_spec())
    job = Job(
        "j1",
        "default",
        spec,
        JobState.RUNNING,
        datetime.now(UTC),
        latest_metrics=(Metric("accuracy", 0.9, Split.VALIDATION, 10),),
        start_time=datetime.now(UTC),
    )
    assert from_plain(Job, to_plain(job)) == job


# -- few labels and (IA)^3 ------------------------------------------------------------------------------------


def _few(**few: Any) -> pb.JobSpec:
    return _spec(**{f"hyper_parameters__few_labels__{name}": value for name, value in few.items()})


def test_few_labels_settings_default_off_and_round_trip_into_the_lineage() -> None:
    assert not convert.spec_from_proto(_few()).hyper_parameters.few_labels.enabled
    assert "few_labels.augmentation_copies" not in d.flatten_hyper_parameters(convert.spec_from_proto(_few()))
    spec = convert.spec_from_proto(_few(augmentation_copies=4, adversarial_epsilon=1.5))
    few = spec.hyper_parameters.few_labels
    assert (few.augmentation_copies, few.augmentation_probability, few.adversarial_epsilon) == (4, 0.1, 1.5)
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert from_plain(d.JobSpec, to_plain(spec)) == spec
    flat = d.flatten_hyper_parameters(spec)
    assert flat["few_labels.augmentation_copies"] == "4" and flat["few_labels.augmentation_probability"] == "0.1"
    assert flat["few_labels.adversarial_epsilon"] == "1.5"


@pytest.mark.parametrize(
    ("few", "message"),
    [
        ({"augmentation_copies": 17}, "augmentation_copies must be between 0 and 16"),
        ({"augmentation_copies": -1}, "augmentation_copies must be between 0 and 16"),
        ({"augmentation_copies": 2, "augmentation_probability": 0.6}, "augmentation_probability must be in (0, 0.5]"),
        ({"augmentation_copies": 2, "augmentation_probability": 0.0}, "augmentation_probability must be in (0, 0.5]"),
        ({"augmentation_probability": 0.2}, "only used with augmentation_copies"),
        ({"adversarial_epsilon": -1.0}, "adversarial_epsilon must be between 0"),
        ({"adversarial_epsilon": float("nan")}, "adversarial_epsilon must be a finite number"),
    ],
)
def test_bad_few_labels_settings_are_refused_naming_the_field(few: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        convert.spec_from_proto(_few(**few))


def test_few_labels_are_for_classifiers_only() -> None:
    spec = _few(adversarial_epsilon=1.0)
    spec.objective = pb.OBJECTIVE_SFT
    with pytest.raises(InvalidArgumentError, match="only for objective classify .*, not sft") as caught:
        convert.spec_from_proto(spec)
    assert caught.value.details == {"field": "spec.hyper_parameters.few_labels"}
    spec.objective = pb.OBJECTIVE_CLASSIFY
    assert convert.spec_from_proto(spec).hyper_parameters.few_labels.adversarial_epsilon == 1.0
    # The objective known only at resolution (from the dataset version's task type) is checked there.
    with pytest.raises(InvalidArgumentError, match="only for objective classify .*, not dpo"):
        d.check_few_labels(d.build_few_labels(augmentation_copies=1), Objective.DPO)


def test_ia3_is_a_classifier_method_without_lora_settings() -> None:
    ia3 = _few()
    ia3.method = pb.TRAINING_METHOD_IA3
    parsed = convert.spec_from_proto(ia3)
    assert parsed.method is d.Method.IA3 and parsed.lora is None
    assert parsed.hyper_parameters.learning_rate == 3e-2  # its default
    assert d.flatten_hyper_parameters(parsed)["method"] == "ia3"
    ia3.lora.rank = 4
    with pytest.raises(InvalidArgumentError, match="spec.lora is only valid with method LORA"):
        convert.spec_from_proto(ia3)
    ia3.ClearField("lora")
    ia3.objective = pb.OBJECTIVE_SFT
    with pytest.raises(InvalidArgumentError, match="TRAINING_METHOD_IA3 trains classifiers"):
        convert.spec_from_proto(ia3)
    with pytest.raises(InvalidArgumentError, match="TRAINING_METHOD_IA3 trains classifiers"):
        d.check_method_objective(d.Method.IA3, False, Objective.DPO)
    ia3.objective = pb.OBJECTIVE_CLASSIFY
    ia3.publish_merged = True
    with pytest.raises(InvalidArgumentError, match="method ia3 trains classifiers only"):
        convert.spec_from_proto(ia3)
