"""Labeling commands: ``projects``, ``import``, ``label``, ``agreement``, ``datasets``."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.cli.context import state, want_json
from gristmill.cli.output import (
    emit_messages,
    emit_object,
    enum_name,
    fail,
    fmt_float,
    one_line_errors,
    when,
)
from gristmill.client import Gristmill

CHUNK_BYTES = 1024 * 1024
JSON_OPTION = typer.Option(False, "--json", help="print JSON")

projects_app = typer.Typer(help="Labeling projects.", no_args_is_help=True)
datasets_app = typer.Typer(help="Published dataset versions.", no_args_is_help=True)


# --------------------------------------------------------------------------- projects


def project_row(p: lb.Project) -> dict[str, Any]:
    return {
        "project": p.project_id,
        "task": enum_name(common_pb2.TaskType.Name(p.task_type), "TASK_TYPE_"),
        "labels": ",".join(label.name for label in p.label_schema.labels),
        "items": p.stats.item_count,
        "labeled": p.stats.labeled_item_count,
        "conflicts": p.stats.conflict_item_count,
        "versions": p.stats.dataset_version_count,
        "created": when(p.create_time),
    }


def create_project_request(
    name: str,
    labels: list[str],
    *,
    project_id: str = "",
    description: str = "",
    multi_label: bool = False,
    annotators: int = 1,
    ordering: str = "sequential",
    active_learning: bool = False,
) -> lb.CreateProjectRequest:
    orderings = {
        "sequential": lb.TASK_ORDERING_SEQUENTIAL,
        "random": lb.TASK_ORDERING_RANDOM,
        "uncertainty": lb.TASK_ORDERING_UNCERTAINTY_FIRST,
    }
    if ordering not in orderings:
        fail(f"--ordering must be one of {', '.join(orderings)}, got {ordering!r}", code=2)
    return lb.CreateProjectRequest(
        project_id=project_id,
        display_name=name,
        description=description,
        task_type=(
            common_pb2.TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION
            if multi_label
            else common_pb2.TASK_TYPE_TEXT_CLASSIFICATION
        ),
        labels=[lb.LabelDefinition(name=label) for label in labels],
        settings=lb.ProjectSettings(
            annotations_per_item=annotators,
            task_ordering=orderings[ordering],
            active_learning=lb.ActiveLearningSettings(import_uncertain_predictions=active_learning),
        ),
    )


@projects_app.command("list")
@one_line_errors
def projects_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """The organisation's projects, newest first."""
    with state(ctx).client() as gm:
        reply = gm.labeling.ListProjects(lb.ListProjectsRequest())
    emit_messages(reply.projects, project_row, want_json(ctx, as_json))


@projects_app.command("create")
@one_line_errors
def projects_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="display name (the id is derived from it unless --id is given)"),
    labels: str = typer.Option(..., "--labels", help="comma-separated label names, in class order"),
    project_id: str = typer.Option("", "--id", help="project id (slug)"),
    description: str = typer.Option("", help="free text"),
    multi_label: bool = typer.Option(False, "--multi-label", help="any number of labels per item"),
    annotators: int = typer.Option(1, help="annotations needed per item"),
    ordering: str = typer.Option("sequential", help="task order: sequential, random or uncertainty"),
    active_learning: bool = typer.Option(False, "--active-learning", help="uncertain predictions become items"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a text classification project."""
    names = [label.strip() for label in labels.split(",") if label.strip()]
    request = create_project_request(
        name,
        names,
        project_id=project_id,
        description=description,
        multi_label=multi_label,
        annotators=annotators,
        ordering=ordering,
        active_learning=active_learning,
    )
    with state(ctx).client() as gm:
        project = gm.labeling.CreateProject(request)
    emit_object(project_row(project), want_json(ctx, as_json), raw=project)


@projects_app.command("show")
@one_line_errors
def projects_show(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """One project with its schema and counts."""
    with state(ctx).client() as gm:
        project = gm.labeling.GetProject(lb.GetProjectRequest(project_id=project_id))
    emit_object(project_row(project), want_json(ctx, as_json), raw=project)


# --------------------------------------------------------------------------- import


def import_options(
    project_id: str,
    path: Path,
    *,
    file_format: str = "auto",
    delimiter: str = "",
    no_header: bool = False,
    columns: str = "",
    text_field: str = "",
    label_field: str = "",
    id_field: str = "",
    annotator: str = "",
    request_id: str = "",
) -> lb.ImportOptions:
    """The import's options: the format from the file name unless given (.jsonl → JSONL, .csv → CSV,
    .tsv/.txt → tab-separated CSV)."""
    suffix = path.suffix.lower()
    fmt = file_format
    if fmt == "auto":
        fmt = {
            ".jsonl": "jsonl",
            ".json": "jsonl",
            ".ndjson": "jsonl",
            ".csv": "csv",
            ".tsv": "tsv",
            ".txt": "tsv",
        }.get(suffix, "")
        if not fmt:
            fail(f"cannot tell the format of {path.name!r}: pass --format jsonl, csv or tsv", code=2)
    if fmt not in ("jsonl", "csv", "tsv"):
        fail(f"--format must be jsonl, csv or tsv, got {file_format!r}", code=2)
    options = lb.ImportOptions(
        project_id=project_id,
        format=lb.IMPORT_FORMAT_JSONL if fmt == "jsonl" else lb.IMPORT_FORMAT_CSV,
        request_id=request_id,
        source_name=path.name,
        field_mapping=lb.FieldMapping(external_id_field=id_field, text_field=text_field, label_field=label_field),
        existing_label_annotator_id=annotator,
    )
    if fmt != "jsonl":
        names = [c.strip() for c in columns.split(",") if c.strip()]
        headerless = no_header or (fmt == "tsv" and not names and suffix == ".txt")
        if headerless and not names:
            names = ["text", "label"]
        options.csv.CopyFrom(
            lb.CsvOptions(
                delimiter=delimiter or ("\t" if fmt == "tsv" else ","),
                has_header=not headerless,
                column_names=names if headerless else [],
                # Plain "text<TAB>label" files: a text may begin with '"'.
                disable_quoting=fmt == "tsv",
            )
        )
    return options


def import_requests(options: lb.ImportOptions, stream: BinaryIO) -> Iterator[lb.ImportItemsRequest]:
    """The client stream: the options, then the file in chunks (read lazily: the file is never all in memory)."""
    yield lb.ImportItemsRequest(options=options)
    while chunk := stream.read(CHUNK_BYTES):
        yield lb.ImportItemsRequest(chunk=chunk)


def import_file(gm: Gristmill, options: lb.ImportOptions, path: Path) -> lb.ImportReport:
    if not path.is_file():
        fail(f"{path}: no such file", code=2)
    with path.open("rb") as stream:
        return gm.labeling.ImportItems(import_requests(options, stream))


def report_fields(report: lb.ImportReport) -> dict[str, Any]:
    pii = ", ".join(f"{kind} {count}" for kind, count in sorted(report.pii_masked_by_kind.items()))
    return {
        "import": report.import_id,
        "received": report.received_count,
        "accepted": report.accepted_count,
        "normalized": report.normalized_count,
        "dropped empty": report.dropped_empty_count,
        "dropped too long": report.dropped_too_long_count,
        "dropped exact duplicates": report.dropped_exact_duplicate_count,
        "dropped near duplicates": report.dropped_near_duplicate_count,
        "dropped known ids": report.dropped_existing_external_id_count,
        "pii masked items": f"{report.pii_masked_item_count}" + (f" ({pii})" if pii else ""),
        "labels imported": report.imported_label_count,
        "took": f"{report.duration_ms} ms",
    }


@one_line_errors
def import_command(
    ctx: typer.Context,
    project_id: str = typer.Argument(..., help="project to import into"),
    path: Path = typer.Argument(..., help="a JSONL, CSV or TSV file"),
    file_format: str = typer.Option("auto", "--format", help="jsonl, csv or tsv (auto: from the file name)"),
    delimiter: str = typer.Option("", help="CSV delimiter (default ',' for csv, tab for tsv)"),
    no_header: bool = typer.Option(False, "--no-header", help="the first CSV line is data"),
    columns: str = typer.Option("", help="column names for --no-header, e.g. text,label"),
    text_field: str = typer.Option("", help="field/column with the text (default 'text')"),
    label_field: str = typer.Option("", help="field/column with an existing label (default 'label')"),
    id_field: str = typer.Option("", help="field/column with the item id (default 'id')"),
    annotator: str = typer.Option("", help="existing labels become annotations by this annotator id"),
    request_id: str = typer.Option("", help="idempotency key: a retry with it imports nothing twice"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import a file into a project, streaming; prints the cleaning and PII-masking report."""
    options = import_options(
        project_id,
        path,
        file_format=file_format,
        delimiter=delimiter,
        no_header=no_header,
        columns=columns,
        text_field=text_field,
        label_field=label_field,
        id_field=id_field,
        annotator=annotator,
        request_id=request_id,
    )
    with state(ctx).client() as gm:
        report = import_file(gm, options, path)
    emit_object(report_fields(report), want_json(ctx, as_json), raw=report)


# --------------------------------------------------------------------------- label


@one_line_errors
def label_command(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    annotator: str = typer.Option(..., help="your annotator id (a slug)"),
    limit: int = typer.Option(0, help="stop after this many answers (0: until nothing is left)"),
) -> None:
    """Label items in the terminal: answer with a label's number or name, 's' to skip, 'q' to quit.

    Answers are read from stdin, one per line, so a file of answers can be piped in.
    """
    done = skipped = 0
    with state(ctx).client() as gm:
        while not limit or done + skipped < limit:
            reply = gm.labeling.NextTask(lb.NextTaskRequest(project_id=project_id, annotator_id=annotator))
            if not reply.HasField("task"):
                typer.echo("nothing left to label")
                break
            task = reply.task
            labels = [label.name for label in task.label_schema.labels]
            typer.echo(f"\n[{reply.remaining_count} left] {task.item.text}")
            typer.echo("  " + "  ".join(f"{i}) {name}" for i, name in enumerate(labels, 1)) + "  s) skip  q) quit")
            answer = _ask(labels)
            if answer is None:
                break
            if answer == "":
                gm.labeling.SkipTask(
                    lb.SkipTaskRequest(project_id=project_id, task_id=task.task_id, annotator_id=annotator)
                )
                skipped += 1
                continue
            gm.labeling.SubmitAnnotation(
                lb.SubmitAnnotationRequest(
                    project_id=project_id,
                    item_id=task.item.item_id,
                    annotator_id=annotator,
                    task_id=task.task_id,
                    labels=[answer],
                )
            )
            done += 1
    typer.echo(f"labeled {done}, skipped {skipped}")


def _ask(labels: list[str]) -> str | None:
    """The chosen label, '' to skip, None to quit (also at the end of input)."""
    while True:
        typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            typer.echo("")
            return None
        answer = line.strip()
        if answer.lower() in ("q", "quit"):
            return None
        if answer.lower() in ("s", "skip"):
            return ""
        if answer.isdigit() and 1 <= int(answer) <= len(labels):
            return labels[int(answer) - 1]
        if answer in labels:
            return answer
        typer.echo(f"  answer 1-{len(labels)}, a label name, s or q")


# --------------------------------------------------------------------------- agreement


def agreement_fields(report: lb.AgreementReport) -> dict[str, Any]:
    pairs = "; ".join(
        f"{p.annotator_a}~{p.annotator_b} {fmt_float(p.cohen_kappa if p.HasField('cohen_kappa') else None)}"
        for p in report.pairs
    )
    return {
        "items": report.item_count,
        "annotators": report.annotator_count,
        "observed agreement": fmt_float(report.observed_agreement),
        "fleiss kappa": fmt_float(report.fleiss_kappa if report.HasField("fleiss_kappa") else None),
        "krippendorff alpha": fmt_float(report.krippendorff_alpha if report.HasField("krippendorff_alpha") else None),
        "cohen kappa (pairs)": pairs,
        "agreed / conflicts / resolved": (
            f"{report.agreed_item_count} / {report.conflict_item_count} / {report.resolved_item_count}"
        ),
    }


@one_line_errors
def agreement_command(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """Agreement between annotators (Cohen's and Fleiss' kappa, Krippendorff's alpha)."""
    with state(ctx).client() as gm:
        report = gm.labeling.GetAgreement(lb.GetAgreementRequest(project_id=project_id))
    emit_object(agreement_fields(report), want_json(ctx, as_json), raw=report)


# --------------------------------------------------------------------------- datasets


def version_row(v: lb.DatasetVersion) -> dict[str, Any]:
    counts = {common_pb2.DatasetSplit.Name(s.split): s.item_count for s in v.splits}
    return {
        "version": v.version_number,
        "dataset_version_id": v.dataset_version_id,
        "train": counts.get("DATASET_SPLIT_TRAIN", 0),
        "validation": counts.get("DATASET_SPLIT_VALIDATION", 0),
        "test": counts.get("DATASET_SPLIT_TEST", 0),
        "labels": ",".join(v.label_map.labels),
        "created": when(v.create_time),
    }


@datasets_app.command("publish")
@one_line_errors
def datasets_publish(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    train: float = typer.Option(0.8, help="fraction of items in the train split"),
    validation: float = typer.Option(0.1, help="fraction in the validation split"),
    test: float = typer.Option(0.1, help="fraction in the test split"),
    seed: int = typer.Option(0, help="seed of the deterministic split"),
    description: str = typer.Option("", help="shown in listings"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Publish the labeled items as an immutable dataset version (this starts the auto-train policy)."""
    with state(ctx).client() as gm:
        reply = gm.labeling.PublishDatasetVersion(
            lb.PublishDatasetVersionRequest(
                project_id=project_id,
                ratios=lb.SplitRatios(train=train, validation=validation, test=test),
                seed=seed,
                description=description,
            )
        )
    fields = {**version_row(reply.dataset_version), "created_now": reply.created}
    emit_object(fields, want_json(ctx, as_json), raw=reply)


@datasets_app.command("list")
@one_line_errors
def datasets_list(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """A project's dataset versions, newest first."""
    with state(ctx).client() as gm:
        reply = gm.labeling.ListDatasetVersions(lb.ListDatasetVersionsRequest(project_id=project_id))
    emit_messages(reply.dataset_versions, version_row, want_json(ctx, as_json))


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
