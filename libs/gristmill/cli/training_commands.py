"""Training commands: ``train`` (submit, or set the project's auto-train policy) and ``jobs``."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.context import state, want_json
from gristmill.cli.job_specs import job_spec, spec_from_file
from gristmill.cli.labeling_commands import dataset_version
from gristmill.cli.options import JSON_OPTION, read_text_option
from gristmill.cli.output import emit_object, enum_name, fail, message_dict, one_line_errors, when
from gristmill.cli.polling import registered_version
from gristmill.cli.replies import show_list, show_one
from gristmill.client import Gristmill, UnavailableError

# A finished job's version normally appears within a second or two; a busy Kafka consumer group can take longer.
REGISTRATION_TIMEOUT_S = 120.0
TERMINAL = {tr.JOB_STATE_SUCCEEDED, tr.JOB_STATE_FAILED, tr.JOB_STATE_CANCELLED}
# Metrics the progress line shows as they arrive (classification, sft, dpo).
PROGRESS_METRICS = ("loss", "accuracy", "f1", "reward_accuracy")

jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
autotrain_app = typer.Typer(
    help="A project's auto-train policy (set it with `train PROJECT --auto ...`): show, delete.", no_args_is_help=True
)


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


def progress_text(metrics: str, tokens_per_second: float) -> str:
    """What the progress line shows after the bar: the latest metrics, then ``N tok/s`` once the job reports token
    throughput."""
    if tokens_per_second <= 0:
        return metrics
    return f"{metrics} {tokens_per_second:.0f} tok/s".lstrip()


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


# --------------------------------------------------------------------------- hyper-parameter search

SEARCH_SYNTAX = "expected NAME=uniform(MIN,MAX), NAME=loguniform(MIN,MAX) or NAME=choice(V1,V2,...)"
_SEARCH_EXPRESSION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*([a-z_]+)\s*\((.*)\)\s*$")
_DOMAINS = {"uniform": "uniform", "loguniform": "log_uniform", "log_uniform": "log_uniform", "choice": "choice"}
MODES = {"max": common_pb2.METRIC_GOAL_MAXIMIZE, "min": common_pb2.METRIC_GOAL_MINIMIZE}
SCHEDULERS = {"asha": tr.SEARCH_SCHEDULER_ASHA, "fifo": tr.SEARCH_SCHEDULER_FIFO}


class SearchSpecError(ValueError):
    """A search expression or file that cannot be read; the message says what was expected."""


def parameter_name(name: str) -> str:
    """``lora_rank`` → ``lora.rank`` (the API's dotted name); other names as given (the service checks them)."""
    return "lora." + name.removeprefix("lora_") if name.startswith("lora_") else name


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SearchSpecError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise SearchSpecError(f"{where}: {text.strip()!r} is not a finite number")
    return value


def search_dimension(name: str, domain: str, values: Sequence[float], where: str) -> tr.SearchDimension:
    """One dimension, with the checks that need no server (the service checks the parameter names)."""
    dimension = tr.SearchDimension(parameter=parameter_name(name))
    if domain == "choice":
        if not values:
            raise SearchSpecError(f"{where}: choice() needs at least one value")
        dimension.choice.values.extend(values)
        return dimension
    if len(values) != 2:
        raise SearchSpecError(f"{where}: {domain}() takes two numbers, MIN and MAX (got {len(values)})")
    low, high = values
    if not low < high:
        raise SearchSpecError(f"{where}: needs MIN < MAX (got {low:g}, {high:g})")
    if domain == "log_uniform" and low <= 0:
        raise SearchSpecError(f"{where}: loguniform() needs MIN > 0 (got {low:g})")
    getattr(dimension, domain).CopyFrom(tr.Range(min=low, max=high))
    return dimension


def parse_search_expression(text: str) -> tr.SearchDimension:
    """``learning_rate=loguniform(1e-5,1e-3)``, ``lora.rank=choice(4,8)`` → a ``SearchDimension``."""
    where = f"--search {text!r}"
    match = _SEARCH_EXPRESSION.match(text)
    if not match:
        raise SearchSpecError(f"{where}: {SEARCH_SYNTAX}")
    name, domain, args = match.groups()
    if domain not in _DOMAINS:
        raise SearchSpecError(f"{where}: unknown distribution {domain!r}; use uniform, loguniform or choice")
    values = [_number(arg, where) for arg in args.split(",") if arg.strip()]
    return search_dimension(name, _DOMAINS[domain], values, where)


def search_file_settings(path: Path) -> dict[str, Any]:
    """A search in JSON: ``{"trials": 8, "metric": "f1", "mode": "max", "scheduler": "asha",
    "max_concurrent_trials": 2, "dimensions": {"learning_rate": "loguniform(1e-5,1e-3)", "lora.rank": [4, 8]}}``
    (a list is a choice)."""
    if not path.is_file():
        raise SearchSpecError(f"--search-file {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SearchSpecError(f"--search-file {path}: not JSON: {exc}") from None
    known = {"trials", "max_concurrent_trials", "metric", "mode", "scheduler", "dimensions"}
    if not isinstance(data, dict) or set(data) - known:
        extra = sorted(set(data) - known) if isinstance(data, dict) else []
        raise SearchSpecError(
            f"--search-file {path}: expected an object with {', '.join(sorted(known))}"
            + (f" (unknown: {', '.join(extra)})" if extra else "")
        )
    dims = data.get("dimensions", {})
    if not isinstance(dims, Mapping):
        raise SearchSpecError(f'--search-file {path}: "dimensions" must be an object of NAME: expression or list')
    dimensions = []
    for name, spec in dims.items():
        where = f"--search-file {path}: dimension {name!r}"
        if isinstance(spec, list):
            values = [_number(str(v), where) for v in spec if not isinstance(v, bool)]
            if len(values) != len(spec):
                raise SearchSpecError(f"{where}: a choice is a list of numbers")
            dimensions.append(search_dimension(name, "choice", values, where))
        elif isinstance(spec, str):
            dimensions.append(parse_search_expression(f"{name}={spec}"))
        else:
            raise SearchSpecError(f"{where}: give an expression such as 'uniform(0,0.1)', or a list (a choice)")
    return {**data, "dimensions": dimensions}


def search_spec(
    *,
    expressions: Sequence[str],
    search_file: Path | None,
    trials: int,
    max_concurrent_trials: int,
    metric: str,
    mode: str,
    scheduler: str,
) -> tr.HyperParameterSearch | None:
    """The search the options describe (None: none asked for); options on the command line win over the file's.

    Raises ``SearchSpecError`` for what can be told wrong without asking the service.
    """
    settings = search_file_settings(search_file) if search_file is not None else {}
    dimensions = list(settings.get("dimensions", []))
    for text in expressions:
        dimensions.append(parse_search_expression(text))
    if not dimensions:
        if search_file is not None:
            raise SearchSpecError(f"--search-file {search_file}: no dimensions to search")
        if trials or max_concurrent_trials or metric or mode or scheduler:
            raise SearchSpecError("--trials, --metric, --mode and --scheduler need --search or --search-file")
        return None
    names = [d.parameter for d in dimensions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SearchSpecError(f"--search: {', '.join(duplicates)} searched more than once")
    trials = trials or int(settings.get("trials", 0) or 0)
    if trials < 1:
        raise SearchSpecError("a search needs --trials N (how many trials to run, >= 1)")
    mode = mode or str(settings.get("mode", ""))
    if mode and mode not in MODES:
        raise SearchSpecError(f"--mode must be max or min, got {mode!r}")
    scheduler = scheduler or str(settings.get("scheduler", ""))
    if scheduler and scheduler not in SCHEDULERS:
        raise SearchSpecError(f"--scheduler must be asha or fifo, got {scheduler!r}")
    return tr.HyperParameterSearch(
        num_trials=trials,
        max_concurrent_trials=max_concurrent_trials or int(settings.get("max_concurrent_trials", 0) or 0),
        metric=metric or str(settings.get("metric", "")),
        goal=MODES.get(mode, common_pb2.METRIC_GOAL_UNSPECIFIED),
        scheduler=SCHEDULERS.get(scheduler, tr.SEARCH_SCHEDULER_UNSPECIFIED),
        dimensions=dimensions,
    )


def search_text(search: tr.HyperParameterSearch) -> str:
    """``4 trials on f1 (max): learning_rate=loguniform(1e-05,0.001) lora.rank=choice(4,8)``, for tables."""
    parts = []
    for d in search.dimensions:
        which = d.WhichOneof("domain")
        if which == "choice":
            parts.append(f"{d.parameter}=choice({','.join(f'{v:g}' for v in d.choice.values)})")
        elif which is not None:
            r = getattr(d, which)
            parts.append(f"{d.parameter}={which.replace('_', '')}({r.min:g},{r.max:g})")
    mode = {common_pb2.METRIC_GOAL_MAXIMIZE: "max", common_pb2.METRIC_GOAL_MINIMIZE: "min"}.get(search.goal, "")
    return f"{search.num_trials} trials on {search.metric or 'f1'}{f' ({mode})' if mode else ''}: {' '.join(parts)}"


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
    """Follow ``WatchJob`` until the job ends (resuming after a dropped stream); returns the final job. ``on_event``
    gets the state, step, total steps and the progress text (``progress_text``) after each event."""
    after: int | None = None
    state, step, total = "queued", 0, 0
    metrics = ""
    # The latest training throughput: metrics events carry it, and so does a state change's progress.
    tokens_per_second = 0.0
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
                    tokens_per_second = change.progress.tokens_per_second or tokens_per_second
                    if change.state in TERMINAL:
                        if on_event is not None:
                            last = total if change.state == tr.JOB_STATE_SUCCEEDED else step
                            on_event(state, last, total, progress_text(metrics, tokens_per_second))
                        return gm.training.GetJob(tr.GetJobRequest(job_id=job_id))
                elif kind == "metrics":
                    step = event.metrics.step or step
                    metrics = metric_text(m for m in event.metrics.metrics if m.name in PROGRESS_METRICS)
                    throughput = metric_value(
                        event.metrics.metrics, "tokens_per_second", common_pb2.DATASET_SPLIT_UNSPECIFIED
                    )
                    tokens_per_second = throughput if throughput is not None else tokens_per_second
                if on_event is not None:
                    on_event(state, step, total, progress_text(metrics, tokens_per_second))
        except UnavailableError:
            pass  # a dropped stream (a restart of the service): reconnect after the last sequence seen
        job = gm.training.GetJob(tr.GetJobRequest(job_id=job_id))
        if job.state in TERMINAL:
            return job


def job_summary(job: tr.Job) -> dict[str, Any]:
    fields = job_row(job)
    if job.spec.HasField("search"):
        fields["search"] = search_text(job.spec.search)
        fields["trials"] = f"{job.progress.trials_completed}/{job.progress.trials_total}"
        if job.HasField("result") and job.result.HasField("best_trial"):
            fields["best trial"] = job.result.best_trial
    if job.HasField("result"):
        fields["metrics"] = metric_text(job.result.metrics)
        fields["artifacts"] = job.result.artifact_prefix
    return fields


def version_artifacts(gm: Gristmill, reference: str, option: str) -> str:
    """The object prefix of ``MODEL`` (its latest READY version) or ``MODEL:VERSION``'s artifacts, as the registry
    holds them: what a job names to start from a registered version, or to distil from one."""
    from gristmill.api.registry.v1 import registry_pb2 as rg

    name, _, version = reference.partition(":")
    if not name or (version and not version.isdigit()):
        fail(f"{option} must be MODEL or MODEL:VERSION (a registered model), got {reference!r}", code=2)
    chosen = gm.registry.GetModelVersion(
        rg.GetModelVersionRequest(
            registered_model_name=name,
            # No selector: the latest READY version.
            selector=common_pb2.ModelVersionSelector(version=int(version)) if version else None,
        )
    )
    return chosen.artifact_prefix.rstrip("/")


@one_line_errors
def train_command(
    ctx: typer.Context,
    project_id: str = typer.Argument(..., help="labeling project whose dataset to train on"),
    version_option: str = typer.Option(
        "",
        "--dataset-version",
        help="dataset version number or id, or 'latest' (default: --spec-file's, else latest)",
    ),
    spec_file: Path | None = typer.Option(
        None,
        "--spec-file",
        help="a JobSpec as JSON (what `jobs show JOB --spec` prints): LoRA targets, warmup, weight decay, schedule, "
        "seed, early stopping, resources, tags...; options given here override its fields",
    ),
    base_model: str = typer.Option("", help="a Hugging Face model directory on the training service's host"),
    base_model_prefix: str = typer.Option("", help="a Hugging Face model directory in the object store"),
    base_model_name: str = typer.Option("", help="a base model imported into the registry"),
    base_model_version: str = typer.Option(
        "",
        "--base-model-version",
        help="start from a registered version's weights, MODEL or MODEL:VERSION (default: the latest); a full model, "
        "not an adapter",
    ),
    model: str = typer.Option("", help="register the result as a version of this registered model"),
    name: str = typer.Option("", help="the job's display name"),
    epochs: int = typer.Option(0, help="passes over the train split (0: the service default, 3)"),
    learning_rate: float = typer.Option(0.0, help="peak learning rate (0: the service default)"),
    batch_size: int = typer.Option(0, help="examples per worker per step (0: 16)"),
    max_steps: int = typer.Option(0, help="stop after this many steps (0: no limit)"),
    max_length: int = typer.Option(0, help="tokens per text (0: 128)"),
    lora: bool | None = typer.Option(
        None, "--lora/--full", help="train LoRA adapters, or every weight (default: --spec-file's, else full)"
    ),
    qlora: bool = typer.Option(
        False, "--qlora", help="LoRA adapters over a 4-bit quantised base (chat models; needs CUDA GPU workers)"
    ),
    ia3: bool = typer.Option(
        False, "--ia3", help="classifiers: train (IA)^3 scaling vectors and the head only (fewer parameters than LoRA)"
    ),
    objective: str = typer.Option(
        "",
        "--objective",
        help="classify, sft (chat versions) or dpo (preference versions); default: the dataset version's task type",
    ),
    chat_template: Path | None = typer.Option(
        None,
        "--chat-template",
        help="a Jinja chat template file for sft/dpo (default: the base model tokenizer's)",
    ),
    beta: float = typer.Option(0.0, "--beta", min=0.0, help="dpo: the DPO loss temperature (0: 0.1)"),
    dpo_loss: str = typer.Option("", "--dpo-loss", help="dpo: the preference loss, sigmoid (default), ipo or hinge"),
    merged: bool = typer.Option(
        False, "--merged", help="sft/dpo with LoRA: also publish the merged model (base + adapter) under merged/"
    ),
    workers: int = typer.Option(0, min=0, help="data-parallel Ray Train workers (0: --spec-file's, else 1)"),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="sft: shard the model over the --workers (FSDP) instead of a whole copy in each"
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="recompute activations in the backward pass: less memory, slower"
    ),
    augment: int = typer.Option(
        0,
        "--augment",
        min=0,
        max=16,
        help="classify, few labels: this many edited copies of each train example (words swapped or dropped)",
    ),
    adversarial: float = typer.Option(
        0.0,
        "--adversarial",
        min=0.0,
        help="classify, few labels: adversarial training (FGM) on the embeddings with this epsilon (e.g. 1.0)",
    ),
    paraphrase: int = typer.Option(
        0,
        "--paraphrase",
        min=0,
        max=8,
        help="classify, few labels: this many paraphrased copies of each train example, by --paraphrase-model",
    ),
    paraphrase_model: str = typer.Option(
        "", "--paraphrase-model", help="with --paraphrase: a chat base model in the registry (smollm2-135m-instruct)"
    ),
    prune_layers: int = typer.Option(
        0, "--prune-layers", min=0, help="classify, BERT bases: keep this many encoder layers, evenly spaced"
    ),
    prune_embedding_size: int = typer.Option(
        0,
        "--prune-embedding-size",
        min=0,
        help="classify, BERT bases: factorise the embeddings to this width (e.g. 176 of MiniLM's 384)",
    ),
    prune_intermediate_size: int = typer.Option(
        0,
        "--prune-intermediate-size",
        min=0,
        help="classify, BERT bases: keep this many feed-forward neurons per layer (e.g. 768 of MiniLM's 1536)",
    ),
    teacher: str = typer.Option(
        "",
        "--teacher",
        help="classify: distil from this registered classifier, MODEL or MODEL:VERSION (default: the latest)",
    ),
    distil_temperature: float = typer.Option(
        0.0, "--distil-temperature", min=0.0, help="with --teacher: the softmax temperature (0: 2)"
    ),
    distil_weight: float | None = typer.Option(
        None, "--distil-weight", min=0.0, max=1.0, help="with --teacher: the teacher's share of the loss (default 0.9)"
    ),
    search: list[str] = typer.Option(
        [],
        "--search",
        help="search a hyper-parameter, repeatable: NAME=uniform(MIN,MAX), NAME=loguniform(MIN,MAX) or "
        "NAME=choice(V1,V2,...); NAME: learning_rate, weight_decay, warmup_ratio, per_worker_batch_size, "
        "lora.rank, lora.alpha, lora.dropout",
    ),
    search_file: Path | None = typer.Option(
        None, "--search-file", help="the search as JSON: trials, metric, mode, scheduler, dimensions {NAME: expr}"
    ),
    trials: int = typer.Option(0, "--trials", min=0, help="trials a search runs (each a full training run)"),
    max_concurrent_trials: int = typer.Option(
        0, "--max-concurrent-trials", min=0, help="trials at once (0: as many as the cluster fits)"
    ),
    metric: str = typer.Option("", "--metric", help="validation metric a search optimises: accuracy, f1 or loss"),
    mode: str = typer.Option("", "--mode", help="max or min (default: min for loss, max otherwise)"),
    scheduler: str = typer.Option("", "--scheduler", help="asha (stops poor trials early; default) or fifo"),
    auto: bool = typer.Option(False, "--auto", help="set the project's auto-train policy instead of submitting"),
    no_wait: bool = typer.Option(False, "--no-wait", help="submit and print the job id; do not watch it"),
    request_id: str = typer.Option("", help="idempotency key: a retried submit returns the first job"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Fine-tune a model on a published dataset version, with a live progress bar (or set --auto).

    With --search, the job is a hyper-parameter search (Ray Tune): every trial trains with sampled values and the
    best trial's model is the result, e.g. --search 'learning_rate=loguniform(1e-5,1e-3)' --search
    'lora.rank=choice(4,8)' --lora --trials 6 --metric f1 --mode max.

    With --spec-file, the job starts from that spec; every option given on the command line replaces the file's
    field (PROJECT always names the dataset's project; the file's search is kept unless --search or
    --search-file is given).
    """
    as_json = want_json(ctx, as_json)
    try:
        search_settings = search_spec(
            expressions=search,
            search_file=search_file,
            trials=trials,
            max_concurrent_trials=max_concurrent_trials,
            metric=metric,
            mode=mode,
            scheduler=scheduler,
        )
    except SearchSpecError as exc:
        fail(str(exc), code=2)
    base = spec_from_file(spec_file) if spec_file is not None else None
    if not version_option:
        same_project = base is not None and base.dataset_version.project_id in ("", project_id)
        version_option = (base.dataset_version.dataset_version_id if base is not None and same_project else "") or (
            "latest"
        )
    if base_model_version and (base_model or base_model_prefix or base_model_name):
        fail(
            "give exactly one of --base-model, --base-model-prefix, --base-model-name or --base-model-version",
            code=2,
        )
    with state(ctx).client() as gm:
        version = None if auto else dataset_version(gm, project_id, version_option)
        spec = job_spec(
            project_id=project_id,
            dataset_version_id=version.dataset_version_id if version is not None else "",
            base_model=base_model,
            base_model_prefix=(
                version_artifacts(gm, base_model_version, "--base-model-version")
                if base_model_version
                else base_model_prefix
            ),
            base_model_name=base_model_name,
            model=model,
            display_name=name,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            max_steps=max_steps,
            max_length=max_length,
            lora=lora,
            qlora=qlora,
            ia3=ia3,
            objective=objective,
            chat_template=read_text_option(chat_template, "--chat-template"),
            beta=beta,
            dpo_loss=dpo_loss,
            merged=merged,
            workers=workers,
            fsdp=fsdp,
            gradient_checkpointing=gradient_checkpointing,
            augment=augment,
            adversarial=adversarial,
            paraphrase=paraphrase,
            paraphrase_model=paraphrase_model,
            prune_layers=prune_layers,
            prune_embedding_size=prune_embedding_size,
            prune_intermediate_size=prune_intermediate_size,
            teacher_prefix=version_artifacts(gm, teacher, "--teacher") if teacher else "",
            distil_temperature=distil_temperature,
            distil_weight=distil_weight,
            base=base,
        )
        if search_settings is not None:
            spec.search.CopyFrom(search_settings)
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
            emit_object(job_summary(job), as_json, raw=job)
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
    show_list(ctx, lambda gm: gm.training.ListJobs(tr.ListJobsRequest(project_id=project)).jobs, job_row, as_json)


@jobs_app.command("show")
@one_line_errors
def jobs_show(
    ctx: typer.Context,
    job_id: str = typer.Argument(...),
    spec: bool = typer.Option(
        False, "--spec", help="print only the job's spec, as JSON: edit it and resubmit with `train --spec-file`"
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """One job with its progress and result."""
    if spec:
        with state(ctx).client() as gm:
            job = gm.training.GetJob(tr.GetJobRequest(job_id=job_id))
        typer.echo(json.dumps(message_dict(job.spec), indent=2))
        return
    show_one(ctx, lambda gm: gm.training.GetJob(tr.GetJobRequest(job_id=job_id)), job_summary, as_json)


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
    request = tr.CancelJobRequest(job_id=job_id, reason=reason)
    show_one(ctx, lambda gm: gm.training.CancelJob(request), job_row, as_json)


@autotrain_app.command("show")
@one_line_errors
def autotrain_show(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """A project's auto-train policy: the job every published dataset version starts."""
    request = tr.GetAutoTrainPolicyRequest(project_id=project_id)
    show_one(ctx, lambda gm: gm.training.GetAutoTrainPolicy(request), policy_fields, as_json)


def policy_fields(policy: tr.AutoTrainPolicy) -> dict[str, Any]:
    template = policy.job_template
    return {
        "project": policy.project_id,
        "enabled": policy.enabled,
        "model": template.registered_model_name,
        "method": enum_name(tr.TrainingMethod.Name(template.method), "TRAINING_METHOD_"),
        **({"search": search_text(template.search)} if template.HasField("search") else {}),
        "updated": when(policy.update_time),
    }


@autotrain_app.command("delete")
@one_line_errors
def autotrain_delete(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """Remove a project's auto-train policy (publishing no longer starts a job)."""
    with state(ctx).client() as gm:
        gm.training.DeleteAutoTrainPolicy(tr.DeleteAutoTrainPolicyRequest(project_id=project_id))
    emit_object({"project": project_id, "auto-train policy": "deleted"}, want_json(ctx, as_json))
