"""What the supervisor asks of a training back-end: run one job's training, report progress, honour a
cancel, hand back the final model. ``RayJobRunner`` (Ray Train) and ``InProcessRunner`` (one process, no
Ray: tests) implement it."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gristmill.core.manifests import FileEntry
from gristmill.training.domain.resolve import ClusterCapacity, DatasetSplits
from gristmill.training.domain.spec import JobSpec

# The training loop's own bookkeeping file in its final checkpoint; not part of the published model.
LOOP_STATE_FILE = "training_state.json"
# The loop's final report, exactly as the loop made it, beside the final model. A runner takes the run's
# metrics from here: what Ray hands back also carries its own bookkeeping (a Tune trial's result adds pid,
# timestamp, time_total_s, training_iteration, hostname, config, ...), which are not metrics of the model.
LOOP_REPORT_FILE = "final_report.json"
# Sample generations on the test split (JSON list of ``tasks.base.SampleGeneration``), beside the final model of a
# generative objective: the model card shows them.
LOOP_SAMPLES_FILE = "sample_generations.json"
# Where a generative LoRA job's artifact holds the merged model (spec.publish_merged), beside the adapter.
MERGED_MODEL_DIR = "merged"
# Files of the final checkpoint that are the loop's, not the model's.
LOOP_FILES = frozenset({LOOP_STATE_FILE, LOOP_REPORT_FILE, LOOP_SAMPLES_FILE})


@dataclass(frozen=True)
class SideModel:
    """A model a run uses besides its base (the distillation teacher, the paraphraser): its directory on the host
    that resolved it, and its files in the object store for workers on nodes without that directory (empty for a
    model given by local path)."""

    local_dir: str
    files: Mapping[str, FileEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRequest:
    job_id: str
    # Ray Train run name: the checkpoint directory; running the same name again resumes from it.
    run_name: str
    spec: JobSpec
    data: DatasetSplits
    model_dir: Path
    # The base model's files in the object store (relative name -> entry), for workers on nodes that do not see
    # ``model_dir``; empty for a model given by local path.
    model_files: Mapping[str, FileEntry] = field(default_factory=dict)
    # The models the run uses besides its base, by role (``spec.side_models``).
    side_models: Mapping[str, SideModel] = field(default_factory=dict)
    # ``spec.evaluation_dataset_version``'s test conversations (None: the generation evaluation uses the job's own).
    generation_examples: Sequence[Any] | None = None


@dataclass(frozen=True)
class RunOutcome:
    # The final report's metrics (test split included).
    metrics: dict[str, Any]
    # A local directory with the final model files (the runner owns it until ``cleanup``).
    model_dir: Path
    trainable_parameters: int
    total_parameters: int
    # Searches: the winning trial's index and effective spec (its sampled hyper-parameters).
    best_trial: int | None = None
    spec: JobSpec | None = None


class RunListener(Protocol):
    """Receives the loop's progress records as they arrive (on the run's driver thread)."""

    def on_records(self, records: list[dict[str, Any]]) -> None: ...


class RunCancelledError(Exception):
    """The run stopped because it was cancelled."""


class RunFailedError(Exception):
    """The run failed; the message is what the job's state_reason shows."""


class RunUnavailableError(RunFailedError):
    """The run failed because a dependency it needs (the object store its checkpoints go to) could not be
    reached: the job waits and runs again under the same run name, resuming from its last checkpoint."""


class JobRunner(Protocol):
    # Whether ``run`` can run a spec with a hyper-parameter search.
    supports_search: bool

    def capacity(self) -> ClusterCapacity: ...

    def run(self, request: RunRequest, listener: RunListener, cancel: threading.Event) -> RunOutcome:
        """Train until done (blocking). Raises ``RunCancelledError`` once ``cancel`` is set and the run stopped,
        ``RunFailedError`` when it failed for good."""
        ...

    def cleanup(self, outcome: RunOutcome) -> None:
        """Remove what ``run`` left on local disk for the outcome."""
        ...
