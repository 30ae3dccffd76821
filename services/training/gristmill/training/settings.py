"""Training service settings (environment prefix ``GRISTMILL_TRAINING_``), read only by ``__main__``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gristmill.core.events.topics import TRAINING_AUTO_TRAIN
from gristmill.core.ports import TRAINING_PORT, default_address
from gristmill.core.settings import ServiceSettings


class TrainingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_TRAINING_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=TRAINING_PORT, ge=0, le=65535)
    # Empty: the service starts a local Ray with ``ray_num_cpus`` CPUs (its workers are processes of their
    # own). Otherwise the address of an existing cluster ("ray://head:10001" or "head:6379"); the service is
    # then the driver of its runs, so they stop when it stops.
    ray_address: str = ""
    # CPUs (and GPUs; empty = detect) the local Ray offers. Keep it at or below the machine's cores: the
    # largest job the cluster can ever run is checked against it at submit time.
    ray_num_cpus: int = Field(default=2, ge=1)
    ray_num_gpus: int | None = Field(default=None, ge=0)
    # Forward the Ray workers' stdout/stderr to the service's log (noisy; Ray keeps them in its session dir).
    ray_log_to_driver: bool = False
    # Train-worker processes the local Ray keeps started and imported while no job runs, so that the next job's
    # worker skips its process start and imports (runner/warm.py); 0: none. Each holds ~0.5 GB while it waits.
    ray_warm_workers: int = Field(default=1, ge=0)
    # Jobs whose Ray runs are driven at once; later jobs stay QUEUED until one finishes.
    max_running_jobs: int = Field(default=2, ge=1)
    # A job whose object store (data, checkpoints, result) cannot be reached waits and runs again, first after
    # dependency_retry_s, doubling up to a minute, for at most dependency_wait_s; then it is FAILED.
    dependency_wait_s: float = Field(default=900.0, ge=0)
    dependency_retry_s: float = Field(default=5.0, gt=0)
    # Where the registry's gRPC API listens: a job names its base model by registry name (BaseModelRef.
    # base_model_name), looked up with GetBaseModel and downloaded (verified) into <data_dir>/base-models.
    registry_address: str = default_address("registry")
    registry_timeout_s: float = Field(default=30.0, gt=0)
    # Accept BaseModelRef.local_path (a directory on this host). Embedded and local modes only.
    allow_local_paths: bool = True
    # Ray Train checkpoints kept per run besides the latest (CheckpointConfig.num_to_keep).
    checkpoints_to_keep: int = Field(default=1, ge=1)
    # Consumer group of the auto-train consumer (DatasetVersionPublished); one per installation, so that two
    # installations sharing a Kafka cluster (tests, the end-to-end demo) do not take each other's events.
    auto_train_group: str = Field(default=TRAINING_AUTO_TRAIN.default, pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")
