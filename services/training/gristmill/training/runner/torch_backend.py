"""What a run's controller unpickles, without torch: Ray Train's torch backend, and the loop's config sealed.

A run's ``TrainController`` actor is a fresh process per run. It unpickles the trainer's backend config and the run's
context, which carries ``train_loop_config``. Ray's ``TorchConfig`` lives in a module that imports torch at the top,
and the ``LoopConfig`` in ours, so every controller imported torch and the loop (~1.4 s of a core) before it could
start the run's workers: on the critical path of every job's first step, for nothing, since the controller only
carries the loop's config and asks the workers to set up their process group. ``SealedConfig`` keeps the loop's
config pickled until a worker opens it. ``LightTorchConfig`` is the same three settings
in a module that imports no torch; its backend does what Ray's ``_TorchBackend`` does on the controller (choose the
backend, give the workers rank 0's address, set their torch environment, join the process group, leave it at the
end) by calling Ray's own worker-side functions on the workers, where torch is imported anyway. TPU process groups
(never used here) go to Ray's backend unchanged.

``FixedLocalScalingPolicy`` travels to the controller too: Ray Train's fixed scaling without its resource requests.

Nothing here may import torch at module level: ``services/training/tests/unit/test_torch_backend.py`` checks it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import ray
import ray.cloudpickle
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SealedConfig:
    """A value pickled once where the trainer is built and unpickled only by ``open`` (in the workers): processes
    that merely carry it (the run's controller) never import the modules its classes live in."""

    payload: bytes

    @classmethod
    def seal(cls, value: Any) -> SealedConfig:
        return cls(ray.cloudpickle.dumps(value))  # type: ignore[no-untyped-call]

    def open(self) -> Any:
        return ray.cloudpickle.loads(self.payload)


@dataclass
class LightTorchConfig(BackendConfig):
    """``ray.train.torch.TorchConfig``'s settings (``TorchTrainer`` fills in ``backend``: gloo, or nccl on GPUs)."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return LightTorchBackend

    @property
    def train_func_context(self) -> type[TorchTrainFuncContext]:
        return TorchTrainFuncContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}

    def torch_config(self) -> Any:
        """Ray's own ``TorchConfig`` with these settings (imports torch)."""
        from ray.train.torch.config import TorchConfig

        return TorchConfig(backend=self.backend, init_method=self.init_method, timeout_s=self.timeout_s)


class TorchTrainFuncContext:
    """Ray's ``TorchConfigContextManager`` (each worker's default CUDA device), imported on the worker."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        self._inner.__enter__()  # type: ignore[no-untyped-call]

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        return bool(self._inner.__exit__(kind, value, traceback))  # type: ignore[no-untyped-call]


class LightTorchBackend(Backend):
    """What Ray's ``_TorchBackend`` does for CPU and GPU process groups, from a controller without torch."""

    share_cuda_visible_devices: bool = True  # as Ray's: the workers of a node see each other's GPUs

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        assert isinstance(backend_config, LightTorchConfig), type(backend_config)
        backend = backend_config.backend
        if backend is None:
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = "nccl" if gpus > 0 else "gloo"
        if backend == "tpu_dist":
            from ray.train.torch.config import _TorchBackend

            _TorchBackend().on_start(worker_group, backend_config.torch_config())
            return
        from ray._common.network_utils import build_address  # type: ignore[attr-defined]
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master_address, address=address, port=port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{build_address(address, port)}"
        else:
            raise ValueError(f"init_method {backend_config.init_method!r} is not supported: use 'env' or 'tcp'")
        worker_group.execute(_set_torch_environment)
        world = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=world,
                    init_method=url,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_leave_process_group, destroy_process_group=len(worker_group) > 1)
        timeout_s = int(
            os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("torch process group shutdown timed out after %s seconds", timeout_s)


# -- run on the workers -------------------------------------------------------------------------------------------


def _set_master_address(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)


def _set_torch_environment() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()  # type: ignore[no-untyped-call]


def _join_process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _leave_process_group(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)  # type: ignore[no-untyped-call]


class FixedLocalScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size scaling, without registering the run's resources with Ray Data's
    ``AutoscalingCoordinator``.

    Every run's controller sends its workers' resources to that coordinator, a detached actor Ray creates on the
    first run and keeps for the cluster's life, which forwards them to the cluster autoscaler. A local cluster has
    no autoscaler, and jobs use no Ray Data, so the requests reach nobody: the coordinator was one more process
    waking every 10 ms beside the training worker (~0.8 % of a core while a job trained) and a process start in the
    first run. A cluster reached by address may autoscale (KubeRay), so its runs keep Ray's policy.
    """

    def after_controller_start(self, train_run_context: Any) -> None:
        return None

    def _maybe_send_resource_request(self) -> None:
        return None

    def _send_resource_request(self) -> None:
        return None
