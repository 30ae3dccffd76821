"""What one trial of a hyper-parameter search trains with."""

from __future__ import annotations

import pytest

from gristmill.core.errors import InvalidArgumentError
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import BaseModelRef, DatasetRef
from gristmill.training.domain.search import check_search_bounds, metric_key, sample_trials, trial_spec


def _spec(*dimensions: d.SearchDimension, method: d.Method = d.Method.LORA) -> d.JobSpec:
    return d.build_spec(
        display_name="search",
        base_model=BaseModelRef(local_path="/m"),
        dataset=DatasetRef("reviews", "v1"),
        task=d.TaskType.TEXT_CLASSIFICATION,
        method=method,
        lora=d.build_lora(method=method, given=False, target_modules=["query", "value"]),
        hyper_parameters=d.build_hyper_parameters(
            method=method, early_stopping=d.build_early_stopping(patience=2, metric="loss")
        ),
        resources=d.build_resources(),
        search=d.build_search(num_trials=4, metric="accuracy", dimensions=list(dimensions)),
        registered_model_name="",
        tags={},
    )


def _dim(parameter: str, distribution: d.Distribution, **kwargs: object) -> d.SearchDimension:
    return d.build_search_dimension(0, parameter=parameter, distribution=distribution, method=d.Method.LORA, **kwargs)  # type: ignore[arg-type]


def test_a_trial_takes_its_sampled_values_and_the_search_metric() -> None:
    spec = _spec(
        _dim("learning_rate", d.Distribution.LOG_UNIFORM, low=1e-5, high=1e-3),
        _dim("lora.rank", d.Distribution.CHOICE, values=[4, 16]),
    )
    trial = trial_spec(spec, {"learning_rate": 3e-4, "lora.rank": 16.0})
    assert trial.search is None and trial.hyper_parameters.learning_rate == 3e-4
    assert trial.lora == d.LoraSettings(rank=16, alpha=32.0, dropout=0.1, target_modules=("query", "value"))
    # Trials stop early (and keep their best checkpoint) on the metric they are compared on.
    assert trial.hyper_parameters.early_stopping.metric == "accuracy"
    assert trial.hyper_parameters.early_stopping.goal is d.Goal.MAXIMIZE
    assert trial.hyper_parameters.early_stopping.patience == 2
    assert metric_key(spec.search) == "validation_accuracy"  # type: ignore[arg-type]
    assert d.flatten_hyper_parameters(trial)["lora.rank"] == "16"


def test_integer_parameters_are_rounded_and_bounds_are_checked() -> None:
    spec = _spec(_dim("per_worker_batch_size", d.Distribution.UNIFORM, low=4, high=64))
    assert trial_spec(spec, {"per_worker_batch_size": 23.6}).hyper_parameters.per_worker_batch_size == 24
    check_search_bounds(spec)
    with pytest.raises(InvalidArgumentError, match="'weight_decay' reaches 2"):
        check_search_bounds(_spec(_dim("weight_decay", d.Distribution.UNIFORM, low=0.0, high=2.0)))
    with pytest.raises(InvalidArgumentError, match="'lora.dropout' reaches 1"):
        check_search_bounds(_spec(_dim("lora.dropout", d.Distribution.CHOICE, values=[0.1, 1.0])))


def test_trials_are_sampled_reproducibly_and_choices_are_covered() -> None:
    search = _spec(
        _dim("learning_rate", d.Distribution.LOG_UNIFORM, low=1e-5, high=1e-3),
        _dim("weight_decay", d.Distribution.UNIFORM, low=0.0, high=0.1),
        _dim("lora.rank", d.Distribution.CHOICE, values=[4, 8]),
    ).search
    assert search is not None
    trials = sample_trials(search, seed=42)
    assert trials == sample_trials(search, seed=42) != sample_trials(search, seed=43)
    assert len(trials) == 4
    assert sorted(t["lora.rank"] for t in trials) == [4, 4, 8, 8]  # each choice as often as the others
    assert all(1e-5 <= t["learning_rate"] <= 1e-3 and 0.0 <= t["weight_decay"] <= 0.1 for t in trials)
