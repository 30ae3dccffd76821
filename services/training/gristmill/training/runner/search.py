"""Hyper-parameter search jobs: a Ray Tune ``Tuner`` whose trials each run a ``TorchTrainer``.

The trials are sampled up front from the job's seed (one grid entry each, ``domain.search.sample_trials``).
Each trial's Tune function (no CPU of its own) builds the trial's spec (``domain.search.trial_spec``) and runs
one Ray Train run named ``<job>-trial-<n>``; ``TuneReportCallback`` forwards every evaluation to Tune, so
ASHA can stop poor trials early. Progress records carry the trial
index. The job's result is the best *finished* trial's final model, compared on the search metric.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any

from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.stopper import Stopper

from gristmill.training.domain.runs import RunFailedError, RunRequest
from gristmill.training.domain.search import metric_key, sample_trials, trial_spec
from gristmill.training.domain.spec import Goal, JobSpec, Scheduler, SearchSettings
from gristmill.training.ml.loop import LoopConfig, train_loop
from gristmill.training.runner.failures import describe_failure
from gristmill.training.runner.torch_backend import SealedConfig
from gristmill.training.runner.trainer import GristmillTorchTrainer, scaling_config


def param_space(search: SearchSettings, seed: int) -> dict[str, Any]:
    """One grid entry per pre-sampled trial (Tune runs each exactly once, in order)."""
    trials = [{"index": i, "values": values} for i, values in enumerate(sample_trials(search, seed))]
    return {"trial": tune.grid_search(trials)}


@dataclass(frozen=True)
class TrialTemplate:
    """What every trial shares (sent once through the object store with ``tune.with_parameters``)."""

    run_name: str
    spec: JobSpec
    loop: LoopConfig
    storage_path: str
    storage_filesystem: Any
    keep_checkpoints: int
    extra_callbacks: tuple[Any, ...]
    # False on a local cluster: the trials' runs send no autoscaling requests (``FixedLocalScalingPolicy``).
    autoscaling: bool = True


def run_trial(config: dict[str, Any], template: TrialTemplate) -> None:
    index = int(config["trial"]["index"])
    spec = trial_spec(template.spec, config["trial"]["values"])
    loop = replace(template.loop, hyper=spec.hyper_parameters, lora=spec.lora, trial=index)
    res = spec.resources
    trainer = GristmillTorchTrainer(
        train_loop,
        autoscaling=template.autoscaling,
        train_loop_config={"loop": SealedConfig.seal(loop)},
        scaling_config=scaling_config(res),
        run_config=RunConfig(
            name=f"{template.run_name}-trial-{index}",
            storage_path=template.storage_path,
            storage_filesystem=template.storage_filesystem,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=template.keep_checkpoints),
            callbacks=[TuneReportCallback(), *template.extra_callbacks],  # type: ignore[no-untyped-call,list-item]
        ),
    )
    trainer.fit()


class _CancelStopper(Stopper):
    """Stops every trial once the job is cancelled."""

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel: threading.Event | None = cancel

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its experiment state with the stopper in it; the event stays with the live driver.
        return {"_cancel": None}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()


def concurrent_trials(search: SearchSettings, spec: JobSpec, cluster_cpus: float) -> int:
    """The search's own limit, or as many trials as the cluster's CPUs fit."""
    if search.max_concurrent_trials:
        return search.max_concurrent_trials
    per_trial = spec.resources.num_workers * spec.resources.cpus_per_worker
    return max(1, min(search.num_trials, math.floor(cluster_cpus / per_trial)))


def run_search(
    request: RunRequest,
    loop: LoopConfig,
    *,
    storage_path: str,
    storage_filesystem: Any,
    keep_checkpoints: int,
    extra_callbacks: tuple[Any, ...],
    cancel: threading.Event,
    cluster_cpus: float,
    autoscaling: bool = True,
) -> tuple[str, dict[str, Any], int, JobSpec]:
    """Run the search; returns (best trial's final model checkpoint path, its Tune result's metrics, its index, its
    effective spec: the trial's sampled values over the job's spec). The Tune result's metrics are the loop's final
    report plus Tune's bookkeeping; the runner publishes the report the loop kept in the checkpoint instead."""
    spec = request.spec
    search = spec.search
    assert search is not None
    key = metric_key(search)
    mode = "max" if search.goal is Goal.MAXIMIZE else "min"
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=100_000, grace_period=1, reduction_factor=2)
        if search.scheduler is Scheduler.ASHA
        else FIFOScheduler()  # type: ignore[no-untyped-call]
    )
    template = TrialTemplate(
        run_name=request.run_name,
        spec=spec,
        loop=loop,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        keep_checkpoints=keep_checkpoints,
        extra_callbacks=extra_callbacks,
        autoscaling=autoscaling,
    )
    tuner = tune.Tuner(
        # The trial function only drives its TorchTrainer: no CPU of its own (Ray needs some resource in the
        # bundle, so a token amount of memory), leaving every CPU to the workers.
        tune.with_resources(tune.with_parameters(run_trial, template=template), {"cpu": 0, "memory": 2**20}),
        param_space=param_space(search, spec.hyper_parameters.seed),
        tune_config=tune.TuneConfig(
            metric=key,
            mode=mode,
            num_samples=1,
            max_concurrent_trials=concurrent_trials(search, spec, cluster_cpus),
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(
            name=request.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            stop=_CancelStopper(cancel),
            verbose=0,
        ),
    )
    results = tuner.fit()
    finished = []
    errors = []
    for i in range(len(results)):
        result = results[i]
        if result.error is not None:
            errors.append(result.error)
        metrics = result.metrics or {}
        if metrics.get("finished") and CHECKPOINT_PATH_KEY in metrics and isinstance(metrics.get(key), int | float):
            finished.append((float(metrics[key]), result))
    if not finished:
        reason = describe_failure(errors[0]) if errors else "no trial finished"
        raise RunFailedError(f"the hyper-parameter search produced no model: {reason}")
    _, best = (max if mode == "max" else min)(finished, key=lambda item: item[0])
    trial = (best.config or {})["trial"]
    best_metrics = dict(best.metrics or {})
    return str(best_metrics[CHECKPOINT_PATH_KEY]), best_metrics, int(trial["index"]), trial_spec(spec, trial["values"])
