"""The trainer every job runs starts no Ray Data dataset manager for runs without Ray datasets, and no placement
group cleaner."""

from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from gristmill.training.runner.trainer import GristmillTorchTrainer


def _loop(config: dict[str, object]) -> None:
    del config


def test_a_run_without_ray_datasets_gets_neither_callback_and_keeps_the_others() -> None:
    ours = GristmillTorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=1))._create_default_callbacks()
    ray_default = TorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=1))._create_default_callbacks()

    dropped = (DatasetsCallback, PlacementGroupCleanerCallback)
    assert all(any(isinstance(c, kind) for c in ray_default) for kind in dropped)
    assert [type(c) for c in ours] == [type(c) for c in ray_default if not isinstance(c, dropped)]
