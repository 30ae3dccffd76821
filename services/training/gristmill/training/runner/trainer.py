"""The ``TorchTrainer`` every job and every search trial runs, and its scaling from a job's resources."""

from __future__ import annotations

from typing import Any

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from gristmill.training.domain.spec import Resources
from gristmill.training.runner.torch_backend import FixedLocalScalingPolicy, LightTorchConfig


def scaling_config(resources: Resources) -> ScalingConfig:
    """``num_workers`` data-parallel workers, each with its CPUs (and GPUs when ``use_gpu``)."""
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker)


class GristmillTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` without two per-run actors that do nothing for these jobs.

    * **the dataset manager**, when the run has no Ray datasets: jobs feed their workers from the dataset version
      (``LoopConfig``), never from Ray Data, yet Ray Train starts a ``DatasetManager`` actor for every run: a
      process whose timers take ~0.5 % of a core for nothing while the job trains.
    * **the placement group cleaner**: a detached actor per run that asks Ray's state API, every second, whether
      the run's controller still lives, to remove its placement group if it died. That API needs Ray's dashboard,
      which a local cluster here does not run, so it never decides (``release_orphaned_placement_groups`` does
      the job from the GCS instead, on any cluster). Meanwhile its process started beside the run's first train
      worker, competing with that worker's start for the CPUs, and took ~1.5 % of a core while the job trained.

    Ray 2.60 builds its default callbacks in one private method; this drops only those two.

    Its backend config is ``LightTorchConfig`` (unless the caller passes one): Ray's ``TorchConfig`` made each run's
    controller import torch before it started the workers (torch_backend.py says why that mattered). With
    ``autoscaling=False`` (a local cluster) its fixed scaling sends no resource requests
    (``FixedLocalScalingPolicy``).
    """

    def __init__(self, *args: Any, autoscaling: bool = True, **kwargs: Any) -> None:
        self._autoscaling = autoscaling
        kwargs.setdefault("torch_config", LightTorchConfig())
        super().__init__(*args, **kwargs)

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        # Ray Train v2's method: ``fit`` builds the policy from the scaling config and passes it here.
        policy = controller_init_kwargs.get("scaling_policy")
        if not self._autoscaling and type(policy) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedLocalScalingPolicy(policy.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)  # type: ignore[misc]

    def _create_default_callbacks(self) -> list[Any]:
        # Ray Train v2's method; the stubs mypy sees are v1's.
        callbacks: list[Any] = super()._create_default_callbacks()  # type: ignore[misc]
        dropped: tuple[type, ...] = (PlacementGroupCleanerCallback,) if self.datasets else UNUSED_CALLBACKS
        return [c for c in callbacks if not isinstance(c, dropped)]


UNUSED_CALLBACKS: tuple[type, ...] = (DatasetsCallback, PlacementGroupCleanerCallback)
