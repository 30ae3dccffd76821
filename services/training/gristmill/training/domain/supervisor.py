"""Runs queued jobs: one driver thread per job, at most ``max_running`` at once, FIFO.

A driver thread loads the job's data and base model (verified again), hands the run to the ``JobRunner``
and turns its progress records into store writes as they arrive: the first ``started`` record moves the
job to RUNNING, a later one (the worker group restarted from a checkpoint) counts a restart, metrics
become events. On success the model is published and the job SUCCEEDED; any failure ends it FAILED with
the error as its reason, so no job is left hanging, except an unreachable dependency (the object store down):
the job waits it out with backoff and runs again, resuming from its last checkpoint. Cancelling sets the run's
cancel flag; the runner aborts the Ray run.

At start, jobs left RUNNING by a process that died are run again under the same Ray run name, so that Ray
Train resumes them from their last checkpoint in the object store (each such resumption counts a restart;
after ``MAX_RESUMES`` restarts, or for a search, the job is FAILED instead), and QUEUED jobs are queued
again. At stop, running jobs are aborted and FAILED with a reason saying so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from opentelemetry import context as otel_context

from gristmill.core.errors import FailedPreconditionError, GristmillError, UnavailableError
from gristmill.training.domain.model import Job, JobState, Metric, MetricsReport, Split
from gristmill.training.domain.ports import JobStore
from gristmill.training.domain.publish import ModelPublisher
from gristmill.training.domain.refs import BaseModelRef
from gristmill.training.domain.resolve import BaseModelCatalog, DatasetCatalog, ResolvedBaseModel
from gristmill.training.domain.runs import (
    JobRunner,
    RunCancelledError,
    RunFailedError,
    RunRequest,
    RunUnavailableError,
    SideModel,
)
from gristmill.training.domain.signal import JobSignal
from gristmill.training.domain.spec import side_models as spec_side_models

log = logging.getLogger(__name__)

LOST_ON_RESTART = (
    "the training service stopped while this job was running, and its Ray run stopped with it; resubmit the job"
)
# How often a job is resumed after the service died under it; beyond that it is FAILED (a job that kills the
# service every time must not do so forever).
MAX_RESUMES = 3
STOPPED_WITH_SERVICE = "the training service shut down while this job was running; resubmit the job"


@dataclass
class _ActiveRun:
    cancel: threading.Event = field(default_factory=threading.Event)
    # Set when the cancel comes from the service stopping rather than from CancelJob.
    shutdown: bool = False
    thread: threading.Thread | None = None


def start_breakdown(record: dict[str, Any], submitted: float) -> str:
    """Where the time from submission to a ``started`` record went, for the log: a slow start names its phase."""
    timings = record.get("timings") or {}
    began = float(record.get("time", 0.0))
    marks = [
        (name, float(timings[key]) - submitted)
        for name, key in (("worker process", "process_started"), ("imports done", "imported"), ("loop", "loop_entered"))
        if timings.get(key)
    ]
    phases = [(name.replace("_", " "), float(value)) for name, value in timings.items() if name.endswith("_s")]
    text = f"{began - submitted:.1f}s after submission" if began else "(no time reported)"
    if marks:
        text += ": " + ", ".join(f"{name} at {at:+.1f}s" for name, at in marks)
    if phases:
        text += "; setup " + ", ".join(f"{name.removesuffix(' s')} {seconds:.1f}s" for name, seconds in phases)
    return text


class _ProgressRecorder:
    """``RunListener`` of one run: progress records -> store writes (on the run's driver thread)."""

    def __init__(self, store: JobStore, signal: JobSignal, job: Job) -> None:
        self._store = store
        self._signal = signal
        self._job_id = job.job_id
        self._run_name = job.ray_run_name
        self.progress = job.progress
        if job.spec.search is not None:
            self.progress = replace(self.progress, trials_total=job.spec.search.num_trials)
        self.started = job.state is JobState.RUNNING
        self._submitted = job.create_time.timestamp()
        self.restarts = job.restart_count
        # Trials of a search that have started; a second start of one of them is a restart.
        self._trials: set[int | None] = set()

    def _transition(
        self, reason: str = "", restart_count: int | None = None, started_at: datetime | None = None
    ) -> None:
        # A job cancelled meanwhile refuses the transition; the runner stops its run.
        with contextlib.suppress(FailedPreconditionError):
            self._store.transition(
                self._job_id,
                JobState.RUNNING,
                reason=reason,
                progress=self.progress,
                restart_count=restart_count,
                ray_run_name=self._run_name,
                started_at=started_at,
            )

    def on_records(self, records: list[dict[str, Any]]) -> None:
        reports: list[MetricsReport] = []
        for record in records:
            kind = record.get("type")
            step = int(record.get("step", self.progress.step))
            trial = record.get("trial")
            if kind == "started":
                self.progress = replace(self.progress, step=step, total_steps=int(record["total_steps"]))
                first_of_trial = trial is not None and trial not in self._trials
                self._trials.add(trial)
                if not self.started:
                    self.started = True
                    log.info("job %s: the loop started %s", self._job_id, start_breakdown(record, self._submitted))
                    # The loop's own clock: records reach the service up to a poll interval later.
                    began = record.get("time")
                    self._transition(started_at=None if began is None else datetime.fromtimestamp(float(began), UTC))
                elif not first_of_trial:
                    self.restarts += 1
                    self._transition(
                        f"the worker group restarted after a failure and resumed from the checkpoint at step {step}",
                        restart_count=self.restarts,
                    )
            elif kind == "train":
                values = record["metrics"]
                self.progress = replace(
                    self.progress,
                    step=step,
                    epoch=float(record["epoch"]),
                    total_steps=int(record.get("total_steps", self.progress.total_steps)),
                    samples_per_second=float(values["samples_per_second"]),
                    tokens_per_second=float(values.get("tokens_per_second", 0.0)),
                )
                reports.append(_report(record, Split.NONE))
            elif kind == "eval":
                split = Split(record["split"])
                reports.append(_report(record, split))
            elif kind == "finished" and trial is not None:
                self.progress = replace(self.progress, trials_completed=self.progress.trials_completed + 1)
        # Progress moves even without metrics (a trial finished); only metrics make events.
        self._store.record_metrics(self._job_id, reports, self.progress)
        self._signal.notify(self._job_id)


def _report(record: dict[str, Any], split: Split) -> MetricsReport:
    step = int(record["step"])
    metrics = tuple(
        Metric(name=str(name), value=float(value), split=split, step=step)
        for name, value in sorted(record["metrics"].items())
    )
    return MetricsReport(step=step, epoch=float(record["epoch"]), metrics=metrics, trial=record.get("trial"))


class JobSupervisor:
    def __init__(
        self,
        store: JobStore,
        runner: JobRunner,
        datasets: DatasetCatalog,
        base_models: BaseModelCatalog,
        publisher: ModelPublisher,
        signal: JobSignal,
        *,
        max_running: int = 2,
        unavailable_timeout_s: float = 900.0,
        retry_backoff_s: float = 5.0,
        dependency_probe: Callable[[], object] | None = None,
    ) -> None:
        self._store = store
        self._runner = runner
        self._datasets = datasets
        self._base_models = base_models
        self._publisher = publisher
        self._signal = signal
        self._max_running = max_running
        # How long a job waits out an unreachable dependency (the object store) before it is FAILED.
        self._unavailable_timeout_s = unavailable_timeout_s
        self._retry_backoff_s = retry_backoff_s
        # Raises (UnavailableError) while the dependency is down: lets a waiting job run again as soon as it is
        # back instead of sleeping out its whole backoff.
        self._dependency_probe = dependency_probe
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._active: dict[str, _ActiveRun] = {}
        # Jobs found RUNNING at start (their process died) and queued again to resume from their checkpoint.
        self._resuming: set[str] = set()
        # The trace context each job was submitted in (a SubmitJob call, or the consumer span of the published
        # dataset version): its driver thread runs in it, so the job's JobStateChanged events, and what the
        # registry and serving do with them, continue that trace. In memory only: a job queued again after a
        # restart starts a trace of its own.
        self._contexts: dict[str, otel_context.Context] = {}
        self._stopping = False
        self._dispatcher: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        with self._cond:
            self._stopping = False
        self._dispatcher = threading.Thread(target=self._dispatch, name="training-dispatcher", daemon=True)
        self._dispatcher.start()

    def recover(self) -> None:
        """Resume jobs whose run died with a previous process (from their last checkpoint); queue the jobs
        that never started."""
        for job in self._store.jobs_in_states([JobState.RUNNING]):
            if job.job_id in self._active:
                continue
            if job.spec.search is not None or job.restart_count >= MAX_RESUMES:
                reason = (
                    LOST_ON_RESTART
                    if job.spec.search is not None
                    else f"{LOST_ON_RESTART} (resumed {job.restart_count} times already)"
                )
                self._fail(job.job_id, reason)
                continue
            log.info(
                "training job %s was running when the service stopped: resuming it from its last checkpoint",
                job.job_id,
            )
            with self._cond:
                self._resuming.add(job.job_id)
            self.enqueue(job.job_id)
        for job in self._store.jobs_in_states([JobState.QUEUED]):
            self.enqueue(job.job_id)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Abort running jobs (they end FAILED, saying why) and stop dispatching. Safe to call twice."""
        with self._cond:
            self._stopping = True
            runs = list(self._active.values())
            self._cond.notify_all()
        for run in runs:
            run.shutdown = True
            run.cancel.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout_s)
            self._dispatcher = None
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout_s)
                if run.thread.is_alive():
                    log.warning("a training run did not stop within %.0fs", timeout_s)

    # -- requests ------------------------------------------------------------------------------------------

    def enqueue(self, job_id: str) -> None:
        with self._cond:
            if job_id not in self._queue and job_id not in self._active:
                self._queue.append(job_id)
                self._contexts[job_id] = otel_context.get_current()
                self._cond.notify_all()

    def cancel(self, job_id: str) -> None:
        """Stop the job's run if it has one (the store already says CANCELLED)."""
        with self._cond:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._contexts.pop(job_id, None)
            run = self._active.get(job_id)
        if run is not None:
            run.cancel.set()

    def running(self) -> list[str]:
        with self._cond:
            return list(self._active)

    # -- the dispatcher and driver threads -----------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or len(self._active) >= self._max_running):
                    self._cond.wait()
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                run = _ActiveRun()
                ctx = self._contexts.pop(job_id, None) or otel_context.Context()
                run.thread = threading.Thread(
                    target=self._drive, args=(job_id, run, ctx), name=f"job-{job_id}", daemon=True
                )
                self._active[job_id] = run
            run.thread.start()

    def _drive(self, job_id: str, run: _ActiveRun, ctx: otel_context.Context) -> None:
        token = otel_context.attach(ctx)
        try:
            job = self._store.get_job(job_id)
            resuming = job.state is JobState.RUNNING and job_id in self._resuming
            if job.state is not JobState.QUEUED and not resuming:
                return
            self._run_until_done(job, run)
        except RunCancelledError:
            if run.shutdown:
                self._fail(job_id, STOPPED_WITH_SERVICE)
        except RunFailedError as exc:
            self._fail(job_id, str(exc))
        except GristmillError as exc:
            self._fail(job_id, exc.message)
        except Exception as exc:
            log.exception("training job %s failed unexpectedly", job_id)
            self._fail(job_id, f"{type(exc).__name__}: {' '.join(str(exc).split())[:900]}")
        finally:
            with self._cond:
                self._active.pop(job_id, None)
                self._resuming.discard(job_id)
                self._cond.notify_all()
            self._signal.notify(job_id)
            otel_context.detach(token)

    def _run_until_done(self, job: Job, run: _ActiveRun) -> None:
        """Run the job; while a dependency is unreachable (the object store: its data, its checkpoints, its
        result), wait with backoff and run it again under the same Ray run name, so that it resumes from its
        last checkpoint. Gives up (FAILED, with the last reason) after ``unavailable_timeout_s``."""
        began = time.monotonic()
        backoff = self._retry_backoff_s
        while True:
            try:
                self._run(job, run)
                return
            except (UnavailableError, RunUnavailableError) as exc:
                reason = exc.message if isinstance(exc, GristmillError) else str(exc)
                waited = time.monotonic() - began
                if waited + backoff > self._unavailable_timeout_s:
                    raise RunFailedError(f"{reason} (still unreachable after {waited:.0f}s)") from exc
                log.warning(
                    "training job %s: %s; running it again once it is reachable (at most %.0fs)",
                    job.job_id,
                    reason,
                    backoff,
                )
                if self._wait_for_dependency(backoff, run.cancel):
                    raise RunCancelledError("cancelled while waiting for a dependency") from exc
                backoff = min(backoff * 2, 60.0)
                job = self._store.get_job(job.job_id)
                if job.state.terminal:
                    return

    def _wait_for_dependency(self, at_most_s: float, cancel: threading.Event) -> bool:
        """Wait until the probe succeeds (checked every second) or ``at_most_s`` passed; True if cancelled."""
        deadline = time.monotonic() + at_most_s
        while (left := deadline - time.monotonic()) > 0:
            if cancel.wait(min(1.0, left)):
                return True
            if self._dependency_probe is not None:
                try:
                    self._dependency_probe()
                except GristmillError:
                    continue
                return False
        return cancel.is_set()

    def _unchanged_model(self, ref: BaseModelRef, organization_id: str, role: str) -> ResolvedBaseModel:
        """The model's files, as they were when the job was submitted (FAILED_PRECONDITION when they changed)."""
        model = self._base_models.resolve(ref, organization_id)
        if ref.content_sha256 and model.ref.content_sha256 != ref.content_sha256:
            raise FailedPreconditionError(
                f"{role}the {ref.describe()} changed since the job was submitted (content sha256 "
                f"{model.ref.content_sha256[:12]}…, expected {ref.content_sha256[:12]}…)"
            )
        return model

    def _run(self, job: Job, run: _ActiveRun) -> None:
        data, files = self._datasets.load_ref(job.spec.dataset)
        base = self._unchanged_model(job.spec.base_model, job.organization_id, "")
        side_models = {}
        for role, ref in spec_side_models(job.spec).items():
            model = self._unchanged_model(ref, job.organization_id, f"{role}: ")
            side_models[role] = SideModel(str(model.local_dir), model.files)
        recorder = _ProgressRecorder(self._store, self._signal, job)
        request = RunRequest(
            job_id=job.job_id,
            run_name=job.ray_run_name,
            spec=job.spec,
            data=data,
            model_dir=base.local_dir,
            model_files=base.files,
            side_models=side_models,
            generation_examples=(
                None
                if job.spec.evaluation_dataset is None
                else self._datasets.evaluation_examples(job.spec.evaluation_dataset)
            ),
        )
        outcome = self._runner.run(request, recorder, run.cancel)
        try:
            current = self._store.get_job(job.job_id)
            if current.state.terminal:
                return  # cancelled while the run was finishing
            if current.state is JobState.QUEUED:
                current, _ = self._store.transition(job.job_id, JobState.RUNNING, progress=recorder.progress)
            result = self._publisher.publish(current, outcome, label_map=data.label_map, dataset_files=files)
            final = outcome.metrics
            progress = replace(
                recorder.progress,
                step=int(final.get("step", recorder.progress.step)),
                epoch=float(final.get("epoch", recorder.progress.epoch)),
            )
            reason = "stopped early: the validation metric stopped improving" if final.get("stopped_early") else ""
            self._store.transition(job.job_id, JobState.SUCCEEDED, reason=reason, result=result, progress=progress)
        finally:
            self._runner.cleanup(outcome)

    def _fail(self, job_id: str, reason: str) -> None:
        # A job that already ended (cancelled, or succeeded just before the error) keeps its state.
        with contextlib.suppress(FailedPreconditionError):
            self._store.transition(job_id, JobState.FAILED, reason=reason)
        self._signal.notify(job_id)
