"""Training commands: ``train`` (submit, or set the project's auto-train policy) and ``jobs``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.context import state, want_json
from gristmill.cli.output import emit_messages, emit_object, enum_name, fail, one_line_errors, when
from gristmill.cli.polling import registered_version
from gristmill.client import Gristmill, UnavailableError

JSON_OPTION = typer.Option(False, "--json", help="print JSON")
# A finished job's version normally appears within a second or two; a busy Kafka consumer group can take longer.
REGISTRATION_TIMEOUT_S = 120.0
TERMINAL = {tr.JOB_STATE_SUCCEEDED, tr.JOB_STATE_FAILED, tr.JOB_STATE_CANCELLED}

jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)


def state_name(value: int) -> str:
    return enum_name(tr.JobState.Name(value), "JOB_STATE_")  # type: ignore[arg-type]


def metric_text(metrics: Any) -> str:
    """``accuracy/test=0.912 loss=0.31`` from a list of ``Metric``."""
    parts = []
    for m in metrics:
        split = enum_name(common_pb2.DatasetSplit.Name(m.split), "DATASET_SPLIT_")
        name = m.name if split == "unspecified" else f"{m.name}/{split}"
        parts.append(f"{name}={m.value:.4g}")
    return " ".join(parts)


def metric_value(metrics: Any, name: str, split: int) -> float | None:
    for m in metrics:
        if m.name == name and m.split == split:
            return float(m.value)
    return None


def job_row(job: tr.Job) -> dict[str, Any]:
    p = job.progress
    return {
        "job": job.job_id,
        "state": state_name(job.state),
        "name": job.spec.display_name,
        "project": job.spec.dataset_version.project_id,
        "model": job.spec.registered_model_name,
        "step": f"{p.step}/{p.total_steps}" if p.total_steps else str(p.step),
        "created": when(job.create_time),
        "reason": job.state_reason[:80],
    }


def job_spec(
    *,
    project_id: str,
    dataset_version_id: str,
    base_model: str,
    base_model_prefix: str = "",
    base_model_name: str = "",
    model: str = "",
    display_name: str = "",
    epochs: int = 0,
    learning_rate: float = 0.0,
    batch_size: int = 0,
    max_steps: int = 0,
    max_length: int = 0,
    log_every_steps: int = 0,
    lora: bool = False,
    workers: int = 1,
) -> tr.JobSpec:
    """A job spec from the command's options (zero values keep the service's documented defaults)."""
    given = [bool(base_model), bool(base_model_prefix), bool(base_model_name)]
    if sum(given) != 1:
        fail("give exactly one of --base-model (a local directory), --base-model-prefix or --base-model-name", code=2)
    ref = common_pb2.BaseModelRef()
    if base_model:
        ref.local_path = base_model
    elif base_model_prefix:
        ref.object_prefix = base_model_prefix
    else:
        ref.base_model_name = base_model_name
    hp = tr.HyperParameters(
        learning_rate=learning_rate,
        per_worker_batch_size=batch_size,
        epochs=epochs,
        max_sequence_length=max_length,
        log_every_steps=log_every_steps,
    )
    if max_steps:
        hp.max_steps = max_steps
    return tr.JobSpec(
        display_name=display_name or f"{project_id} fine-tune",
        base_model=ref,
        dataset_version=common_pb2.DatasetVersionRef(project_id=project_id, dataset_version_id=dataset_version_id),
        method=tr.TRAINING_METHOD_LORA if lora else tr.TRAINING_METHOD_FULL,
        hyper_parameters=hp,
        resources=tr.Resources(num_workers=workers),
        registered_model_name=model,
    )


def dataset_version(gm: Gristmill, project_id: str, version: str) -> lb.DatasetVersion:
    """The dataset version by id, or the newest one for 'latest' (from the labeling service)."""
    if version != "latest":
        return gm.labeling.GetDatasetVersion(
            lb.GetDatasetVersionRequest(project_id=project_id, dataset_version_id=version)
        )
    reply = gm.labeling.ListDatasetVersions(
        lb.ListDatasetVersionsRequest(project_id=project_id, page=common_pb2.PageRequest(page_size=1))
    )
    if not reply.dataset_versions:
        fail(f"project {project_id!r} has no dataset version yet: publish one with `gristmill datasets publish`")
    return reply.dataset_versions[0]


class ProgressLine:
    """A live one-line progress bar on a terminal (a line per change elsewhere, so logs stay readable)."""

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stdout
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""

    def show(self, state: str, step: int, total: int, metrics: str = "") -> None:
        if total:
            filled = int(self.width * min(step, total) / total)
            bar = "#" * filled + "." * (self.width - filled)
            text = f"{state:<9} [{bar}] {step}/{total} {metrics}".rstrip()
        else:
            text = f"{state:<9} step {step} {metrics}".rstrip()
        if text == self._last:
            return
        self._last = text
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(160))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def watch_job(
    gm: Gristmill,
    job_id: str,
    on_event: Callable[[str, int, int, str], None] | None = None,
    *,
    timeout_s: float | None = None,
) -> tr.Job:
    """Follow ``WatchJob`` until the job ends (resuming after a dropped stream); returns the final job."""
    after: int | None = None
    state, step, total = "queued", 0, 0
    metrics = ""
    while True:
        request = tr.WatchJobRequest(job_id=job_id)
        if after is not None:
            request.after_sequence = after
        try:
            # A stream lives as long as the job runs: no per-call deadline unless the caller sets one.
            for event in gm.training.WatchJob(request, timeout=timeout_s or 7 * 24 * 3600.0):
                after = event.sequence
                kind = event.WhichOneof("event")
                if kind == "state_change":
                    change = event.state_change
                    state = state_name(change.state)
                    step, total = change.progress.step or step, change.progress.total_steps or total
                    if change.state in TERMINAL:
                        if on_event is not None:
                            on_event(state, total if change.state == tr.JOB_STATE_SUCCEEDED else step, total, metrics)
                        return gm.training.GetJob(tr.GetJobRequest(job_id=job_id))
                elif kind == "metrics":
                    step = event.metrics.step or step
                    metrics = metric_text(m for m in event.metrics.metrics if m.name in ("loss", "accuracy", "f1"))
                if on_event is not None:
                    on_event(state, step, total, metrics)
        except UnavailableError:
            pass  # a dropped stream (a restart of the service): reconnect after the last sequence seen
        job = gm.training.GetJob(tr.GetJobRequest(job_id=job_id))
        if job.state in TERMINAL:
            return job


def job_summary(job: tr.Job) -> dict[str, Any]:
    fields = job_row(job)
    if job.HasField("result"):
        fields["metrics"] = metric_text(job.result.metrics)
        fields["artifacts"] = job.result.artifact_prefix
    return fields


@one_line_errors
def train_command(
    ctx: typer.Context,
    project_id: str = typer.Argument(..., help="labeling project whose dataset to train on"),
    version_option: str = typer.Option("latest", "--dataset-version", help="dataset version id, or 'latest'"),
    base_model: str = typer.Option("", help="a Hugging Face model directory on the training service's host"),
    base_model_prefix: str = typer.Option("", help="a Hugging Face model directory in the object store"),
    base_model_name: str = typer.Option("", help="a base model imported into the registry"),
    model: str = typer.Option("", help="register the result as a version of this registered model"),
    name: str = typer.Option("", help="the job's display name"),
    epochs: int = typer.Option(0, help="passes over the train split (0: the service default, 3)"),
    learning_rate: float = typer.Option(0.0, help="peak learning rate (0: the service default)"),
    batch_size: int = typer.Option(0, help="examples per worker per step (0: 16)"),
    max_steps: int = typer.Option(0, help="stop after this many steps (0: no limit)"),
    max_length: int = typer.Option(0, help="tokens per text (0: 128)"),
    lora: bool = typer.Option(False, "--lora", help="train LoRA adapters instead of every weight"),
    workers: int = typer.Option(1, help="data-parallel Ray Train workers"),
    auto: bool = typer.Option(False, "--auto", help="set the project's auto-train policy instead of submitting"),
    no_wait: bool = typer.Option(False, "--no-wait", help="submit and print the job id; do not watch it"),
    request_id: str = typer.Option("", help="idempotency key: a retried submit returns the first job"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Fine-tune a model on a published dataset version, with a live progress bar (or set --auto)."""
    as_json = want_json(ctx, as_json)
    with state(ctx).client() as gm:
        version = None if auto else dataset_version(gm, project_id, version_option)
        spec = job_spec(
            project_id=project_id,
            dataset_version_id=version.dataset_version_id if version is not None else "",
            base_model=base_model,
            base_model_prefix=base_model_prefix,
            base_model_name=base_model_name,
            model=model,
            display_name=name,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            max_steps=max_steps,
            max_length=max_length,
            lora=lora,
            workers=workers,
        )
        if version is not None:
            # The manifest's key and checksum, as labeling published them: training reads and verifies it.
            spec.dataset_version.manifest.CopyFrom(version.manifest)
        if auto:
            spec.ClearField("dataset_version")
            policy = gm.training.SetAutoTrainPolicy(
                tr.SetAutoTrainPolicyRequest(
                    policy=tr.AutoTrainPolicy(project_id=project_id, enabled=True, job_template=spec)
                )
            )
            fields = {"project": policy.project_id, "enabled": policy.enabled, "model": spec.registered_model_name}
            emit_object(fields, as_json, raw=policy)
            return
        job = gm.training.SubmitJob(tr.SubmitJobRequest(spec=spec, request_id=request_id))
        if no_wait:
            emit_object(job_row(job), as_json, raw=job)
            return
        if not as_json:
            typer.echo(f"job {job.job_id} submitted; watching (Ctrl-C stops watching, not the job)")
        bar = ProgressLine(sys.stderr if as_json else sys.stdout)
        job = watch_job(gm, job.job_id, bar.show)
        bar.done()
        summary = job_summary(job)
        if job.state == tr.JOB_STATE_SUCCEEDED and model:
            # The registry registers the result from the job's event: wait for it, so that the next command
            # (`models show`, `deploy`) finds the version this one announced.
            registered = registered_version(gm, model, job.job_id, REGISTRATION_TIMEOUT_S)
            summary["registered"] = f"{model} v{registered.version}"
    emit_object(summary, as_json, raw=job)
    if job.state != tr.JOB_STATE_SUCCEEDED:
        fail(f"job {job.job_id} ended {state_name(job.state)}: {job.state_reason or 'no reason given'}")


@jobs_app.command("list")
@one_line_errors
def jobs_list(
    ctx: typer.Context,
    project: str = typer.Option("", help="only jobs on this project's datasets"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Training jobs, newest first."""
    with state(ctx).client() as gm:
        reply = gm.training.ListJobs(tr.ListJobsRequest(project_id=project))
    emit_messages(reply.jobs, job_row, want_json(ctx, as_json))


@jobs_app.command("show")
@one_line_errors
def jobs_show(ctx: typer.Context, job_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """One job with its progress and result."""
    with state(ctx).client() as gm:
        job = gm.training.GetJob(tr.GetJobRequest(job_id=job_id))
    emit_object(job_summary(job), want_json(ctx, as_json), raw=job)


@jobs_app.command("watch")
@one_line_errors
def jobs_watch(ctx: typer.Context, job_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """Follow a job's progress until it ends."""
    as_json = want_json(ctx, as_json)
    bar = ProgressLine(sys.stderr if as_json else sys.stdout)
    with state(ctx).client() as gm:
        job = watch_job(gm, job_id, bar.show)
    bar.done()
    emit_object(job_summary(job), as_json, raw=job)


@jobs_app.command("cancel")
@one_line_errors
def jobs_cancel(
    ctx: typer.Context,
    job_id: str = typer.Argument(...),
    reason: str = typer.Option("cancelled from the CLI", help="recorded as the job's state reason"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Cancel a queued or running job."""
    with state(ctx).client() as gm:
        job = gm.training.CancelJob(tr.CancelJobRequest(job_id=job_id, reason=reason))
    emit_object(job_row(job), want_json(ctx, as_json), raw=job)
