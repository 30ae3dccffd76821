"""A ``JobRunner`` without Ray: the training loop runs in the driver thread, as a single worker.

For unit tests and quick local checks; the service's own wiring always uses ``RayJobRunner``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from gristmill.training.domain.resolve import ClusterCapacity
from gristmill.training.domain.runs import RunCancelledError, RunFailedError, RunListener, RunOutcome, RunRequest
from gristmill.training.ml.loop import FINAL_CHECKPOINT_NAME, DirectorySession, LoopConfig, LoopRunner


class _ListenerSink:
    """Hands each record to the listener at once; raises at the next record once the run is cancelled."""

    def __init__(self, listener: RunListener, cancel: threading.Event) -> None:
        self._listener = listener
        self._cancel = cancel

    def push(self, record: dict[str, Any]) -> None:
        if self._cancel.is_set():
            raise RunCancelledError("the run was cancelled")
        self._listener.on_records([record])


class InProcessRunner:
    supports_search = False

    def __init__(self, work_dir: Path, *, cpus: float = 1.0) -> None:
        self.work_dir = Path(work_dir)
        self.cpus = cpus

    def capacity(self) -> ClusterCapacity:
        return ClusterCapacity(cpus=self.cpus, gpus=0.0, max_node_cpus=self.cpus, max_node_gpus=0.0)

    def run(self, request: RunRequest, listener: RunListener, cancel: threading.Event) -> RunOutcome:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(dir=self.work_dir, prefix=f"{request.job_id}-"))
        spec = request.spec
        config = LoopConfig(
            job_id=request.job_id,
            model_dir=str(request.model_dir),
            label_map=request.data.label_map,
            examples=request.data.examples,
            method=spec.method,
            lora=spec.lora,
            hyper=spec.hyper_parameters,
            cpus_per_worker=spec.resources.cpus_per_worker,
            sink=_ListenerSink(listener, cancel),
            task=spec.task.value,
            chat_template=spec.chat_template,
            dpo=spec.dpo,
            publish_merged=spec.publish_merged,
            json_match_keys=spec.json_match_keys,
            generation_examples=request.generation_examples,
            pruning=spec.pruning,
            distillation=spec.distillation,
            side_models=dict(request.side_models),
        )
        session = DirectorySession(root)
        try:
            LoopRunner(config, 0, 1, 0, session).run()
        except RunCancelledError:
            shutil.rmtree(root, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise RunFailedError(f"{type(exc).__name__}: {exc}") from exc
        if cancel.is_set():
            shutil.rmtree(root, ignore_errors=True)
            raise RunCancelledError("the run was cancelled")
        metrics = session.reports[-1]
        return RunOutcome(
            metrics=metrics,
            model_dir=root / FINAL_CHECKPOINT_NAME,
            trainable_parameters=int(metrics["trainable_parameters"]),
            total_parameters=int(metrics["total_parameters"]),
        )

    def cleanup(self, outcome: RunOutcome) -> None:
        shutil.rmtree(outcome.model_dir.parent, ignore_errors=True)
