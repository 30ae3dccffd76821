"""The ``TorchTrainer`` every job and every search trial runs, and its scaling from a job's resources."""

from __future__ import annotations

from typing import Any

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

from gristmill.training.domain.spec import Resources


def scaling_config(resources: Resources) -> ScalingConfig:
    """``num_workers`` data-parallel workers, each with its CPUs (and GPUs when ``use_gpu``)."""
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker)


class GristmillTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` without the per-run dataset manager actor when the run has no Ray datasets.

    Jobs feed their workers from the dataset version (``LoopConfig``), never from Ray Data, yet Ray Train starts
    a ``DatasetManager`` actor for every run: a process whose timers take ~0.5 % of a core for nothing while the
    job trains. Ray 2.60 builds its default callbacks in one private method; this drops only that one.
    """

    def _create_default_callbacks(self) -> list[Any]:
        # Ray Train v2's method; the stubs mypy sees are v1's.
        callbacks: list[Any] = super()._create_default_callbacks()  # type: ignore[misc]
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
