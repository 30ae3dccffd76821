"""A run's controller receives the trainer's callbacks and run context (which carries the loop's config); unpickling
them must not import torch (it took ~1.4 s of a core in every run's controller, before the workers could start)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import ray.cloudpickle
from ray.train import ScalingConfig

from gristmill.training.ml.loop import FaultInjection
from gristmill.training.runner.progress import RegisterController, RunChannel
from gristmill.training.runner.torch_backend import (
    FixedLocalScalingPolicy,
    LightTorchBackend,
    LightTorchConfig,
    SealedConfig,
)
from gristmill.training.runner.trainer import GristmillTorchTrainer

UNPICKLE = """
import sys
import ray.cloudpickle
payload = ray.cloudpickle.loads(sys.stdin.buffer.read())
print(sorted(type(c).__name__ for c in [*payload["callbacks"], payload["policy"]]))
print("torch imported:", "torch" in sys.modules)
"""


def _train(config: dict[str, object]) -> None:
    raise AssertionError("never runs here")


def _trainer(use_gpu: bool = False) -> GristmillTorchTrainer:
    from ray.train import RunConfig

    return GristmillTorchTrainer(
        _train,
        # A class of the loop's module (which imports torch), as the real LoopConfig is.
        train_loop_config={"loop": SealedConfig.seal(FaultInjection(rank=1, at_step=2))},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu),
        run_config=RunConfig(name="light", callbacks=[RegisterController(RunChannel(None, "job-1"))]),
    )


def test_what_the_controller_unpickles_imports_no_torch() -> None:
    trainer = _trainer()
    payload = {
        "callbacks": trainer._create_default_callbacks(),
        "context": trainer.train_run_context,
        "policy": FixedLocalScalingPolicy(trainer.scaling_config),
    }
    done = subprocess.run(
        [sys.executable, "-c", UNPICKLE], input=ray.cloudpickle.dumps(payload), capture_output=True, check=True
    )
    names, imported = done.stdout.decode().splitlines()
    # The backend's callbacks and ours made the trip...
    expected = {"BackendSetupCallback", "RegisterController", "FixedLocalScalingPolicy"}
    assert expected <= set(ast.literal_eval(names)), names
    # ...without torch.
    assert imported == "torch imported: False", done.stderr.decode()[-2000:]


@pytest.mark.parametrize(("use_gpu", "backend"), [(False, "gloo"), (True, "nccl")])
def test_the_trainer_gets_the_light_config_with_rays_choice_of_backend(use_gpu: bool, backend: str) -> None:
    config = _trainer(use_gpu).backend_config
    assert isinstance(config, LightTorchConfig) and config.backend == backend
    assert config.backend_cls is LightTorchBackend and LightTorchBackend.share_cuda_visible_devices
    # Ray's own config, for what still needs it, with the same settings.
    real = config.torch_config()
    assert (real.backend, real.init_method, real.timeout_s) == (backend, "env", 1800)


def test_a_sealed_config_opens_to_an_equal_value() -> None:
    fault = FaultInjection(rank=1, at_step=2, mode="raise")
    assert SealedConfig.seal(fault).open() == fault


@pytest.mark.parametrize("autoscaling", [False, True])
def test_a_local_clusters_runs_get_fixed_scaling_without_autoscaling_requests(
    autoscaling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    received: dict[str, object] = {}
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", lambda self, **kw: received.update(kw))
    trainer = GristmillTorchTrainer(_train, autoscaling=autoscaling, scaling_config=ScalingConfig(num_workers=2))
    policy = FixedScalingPolicy(trainer.scaling_config)
    trainer._initialize_and_run_controller(scaling_policy=policy, callbacks=[])
    given = received["scaling_policy"]
    if autoscaling:  # a cluster reached by address may autoscale: Ray's own policy
        assert given is policy
        return
    assert type(given) is FixedLocalScalingPolicy and given.scaling_config is trainer.scaling_config
    # Ray is not even initialised here: any request to the coordinator (an actor) would raise.
    given.after_controller_start(trainer.train_run_context)
    decision = given.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    given.make_decision_for_running_worker_group(None, None)  # type: ignore[arg-type]
    given._cancel_resource_request()
