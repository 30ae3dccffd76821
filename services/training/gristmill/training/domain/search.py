"""Hyper-parameter search: what one trial trains with.

Trials are sampled up front, from the job's seed (``sample_trials``), so a search is reproducible. A
trial's sampled values replace the spec's (through the same builders, so a sampled value is checked like
a submitted one), and every trial stops early and keeps its best checkpoint on the search's metric, so
trials are compared on the value each one publishes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import replace

from gristmill.core.errors import InvalidArgumentError
from gristmill.training.domain.spec import (
    SEARCHABLE,
    Distribution,
    DpoSettings,
    EarlyStopping,
    JobSpec,
    SearchSettings,
    build_dpo,
    build_hyper_parameters,
    build_lora,
)


def sample_trials(search: SearchSettings, seed: int) -> list[dict[str, float]]:
    """The sampled values of every trial, reproducible from ``seed`` (the job's seed).

    Choices are stratified: with as many trials as values each value is tried once (more trials cycle
    through them in a seeded order), which random sampling does not promise. Ranges are sampled uniformly
    or log-uniformly."""
    rng = random.Random(seed)
    n = search.num_trials
    columns: dict[str, list[float]] = {}
    for dim in search.dimensions:
        if dim.distribution is Distribution.CHOICE:
            column = [dim.values[i % len(dim.values)] for i in range(n)]
            rng.shuffle(column)
        elif dim.distribution is Distribution.LOG_UNIFORM:
            column = [math.exp(rng.uniform(math.log(dim.low), math.log(dim.high))) for _ in range(n)]
        else:
            column = [rng.uniform(dim.low, dim.high) for _ in range(n)]
        columns[dim.parameter] = column
    return [{name: column[i] for name, column in columns.items()} for i in range(n)]


def metric_key(search: SearchSettings) -> str:
    """The name under which the training loop reports the search's metric."""
    return f"validation_{search.metric}"


def trial_spec(spec: JobSpec, sampled: Mapping[str, float]) -> JobSpec:
    """``spec`` with one trial's sampled hyper-parameters (integers rounded for integer parameters)."""
    if spec.search is None:
        raise ValueError("trial_spec needs a spec with a search")
    values = {name: (round(v) if SEARCHABLE.get(name) else float(v)) for name, v in sampled.items()}
    hp = spec.hyper_parameters
    hyper_changes = {
        k: values[k] for k in ("learning_rate", "weight_decay", "warmup_ratio", "per_worker_batch_size") if k in values
    }
    es = hp.early_stopping
    hyper = replace(
        hp,
        **hyper_changes,  # type: ignore[arg-type]
        early_stopping=EarlyStopping(
            patience=es.patience, metric=spec.search.metric, goal=spec.search.goal, min_delta=es.min_delta
        ),
    )
    lora = spec.lora
    if lora is not None and any(k.startswith("lora.") for k in values):
        rank = int(values.get("lora.rank", lora.rank))
        lora = build_lora(
            method=spec.method,
            given=True,
            rank=rank,
            # Alpha follows a searched rank (2 x rank) unless alpha itself is searched.
            alpha=float(values.get("lora.alpha", 2.0 * rank if "lora.rank" in values else lora.alpha)),
            dropout=float(values.get("lora.dropout", lora.dropout)),
            target_modules=lora.target_modules,
        )
    dpo = spec.dpo
    if "dpo.beta" in values:
        # Before the spec is resolved a DPO job may carry no dpo settings yet: the defaults, beta searched.
        dpo = build_dpo(given=True, beta=values["dpo.beta"], loss=(spec.dpo or DpoSettings()).loss)
    # The builder's range checks apply to sampled values too (a search bound may lie outside them).
    build_hyper_parameters(
        method=spec.method,
        learning_rate=hyper.learning_rate,
        per_worker_batch_size=hyper.per_worker_batch_size,
        warmup_ratio=hyper.warmup_ratio,
        weight_decay=hyper.weight_decay,
    )
    return replace(spec, hyper_parameters=hyper, lora=lora, dpo=dpo, search=None)


def check_search_bounds(spec: JobSpec) -> None:
    """Refuse a search whose bounds or choices lie outside what the parameters accept (INVALID_ARGUMENT)."""
    if spec.search is None:
        return
    for dimension in spec.search.dimensions:
        values = dimension.values if dimension.distribution is Distribution.CHOICE else (dimension.low, dimension.high)
        for value in values:
            try:
                trial_spec(spec, {dimension.parameter: value})
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(
                    f"spec.search dimension {dimension.parameter!r} reaches {value:g}, which is not allowed: "
                    f"{exc.message}",
                    details={"field": "spec.search.dimensions"},
                ) from None
