"""Labeling commands: ``projects``, ``import``, ``agreement`` and ``datasets`` (annotating: ``annotation_commands``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb

# Re-exported: tests/unit/test_cli_parsing.py imports them from here, where they were defined before the split.
from gristmill.cli.context import state, want_json
from gristmill.cli.options import JSON_OPTION, choice, comma_list
from gristmill.cli.output import emit_object, enum_name, fail, fmt_float, one_line_errors, when
from gristmill.cli.project_settings import (
    LABEL_DESCRIPTION_OPTION,
    MAX_TEXT_CHARS_OPTION,
    NEAR_DUPLICATE_THRESHOLD_OPTION,
    NEAR_DUPLICATES_OPTION,
    PII_KINDS_OPTION,
    PII_PATTERN_OPTION,
    STORE_RAW_TEXT_OPTION,
    cleaning_fields,
    cleaning_settings,
    label_definitions,
)
from gristmill.cli.replies import show_list, show_one
from gristmill.client import Gristmill

CHUNK_BYTES = 1024 * 1024

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


ORDERINGS = {
    "sequential": lb.TASK_ORDERING_SEQUENTIAL,
    "random": lb.TASK_ORDERING_RANDOM,
    "uncertainty": lb.TASK_ORDERING_UNCERTAINTY_FIRST,
}
DEFAULT_LEASE_SECONDS = 600
LEASE_SECONDS_OPTION = typer.Option(
    0,
    "--lease-seconds",
    min=0,
    max=86400,
    help=f"how long a task stays leased to an annotator before it returns to the queue (0: {DEFAULT_LEASE_SECONDS})",
)


def project_fields(p: lb.Project) -> dict[str, Any]:
    """One project in full (``create``, ``show``, ``update``): the row, then its settings."""
    settings = p.settings
    ordering = enum_name(lb.TaskOrdering.Name(settings.task_ordering), "TASK_ORDERING_")
    return {
        **project_row(p),
        "name": p.display_name,
        "description": p.description,
        "annotators per item": settings.annotations_per_item or 1,
        "ordering": "sequential" if ordering == "unspecified" else ordering,
        "lease seconds": settings.lease_seconds or DEFAULT_LEASE_SECONDS,
        "active learning": settings.active_learning.import_uncertain_predictions,
        **cleaning_fields(settings.cleaning),
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
    lease_seconds: int = 0,
    cleaning: lb.CleaningSettings | None = None,
    label_descriptions: list[str] | None = None,
) -> lb.CreateProjectRequest:
    task_ordering = choice(ordering, ORDERINGS, "--ordering")
    return lb.CreateProjectRequest(
        project_id=project_id,
        display_name=name,
        description=description,
        task_type=(
            common_pb2.TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION
            if multi_label
            else common_pb2.TASK_TYPE_TEXT_CLASSIFICATION
        ),
        labels=label_definitions(labels, label_descriptions or []),
        settings=lb.ProjectSettings(
            annotations_per_item=annotators,
            task_ordering=task_ordering,
            lease_seconds=lease_seconds,
            cleaning=cleaning,
            active_learning=lb.ActiveLearningSettings(import_uncertain_predictions=active_learning),
        ),
    )


@projects_app.command("list")
@one_line_errors
def projects_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """The organisation's projects, newest first."""
    show_list(ctx, lambda gm: gm.labeling.ListProjects(lb.ListProjectsRequest()).projects, project_row, as_json)


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
    lease_seconds: int = LEASE_SECONDS_OPTION,
    label_description: list[str] = LABEL_DESCRIPTION_OPTION,
    max_text_chars: int | None = MAX_TEXT_CHARS_OPTION,
    near_duplicates: str | None = NEAR_DUPLICATES_OPTION,
    near_duplicate_threshold: float | None = NEAR_DUPLICATE_THRESHOLD_OPTION,
    pii_kinds: str | None = PII_KINDS_OPTION,
    pii_pattern: list[str] = PII_PATTERN_OPTION,
    store_raw_text: bool | None = STORE_RAW_TEXT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a text classification project, with how imports are cleaned and PII masked."""
    cleaning, _ = cleaning_settings(
        max_text_chars=max_text_chars,
        near_duplicates=near_duplicates,
        near_duplicate_threshold=near_duplicate_threshold,
        pii_kind_names=pii_kinds,
        pii_patterns=pii_pattern,
        store_raw_text=store_raw_text,
    )
    request = create_project_request(
        name,
        comma_list(labels),
        project_id=project_id,
        description=description,
        multi_label=multi_label,
        annotators=annotators,
        ordering=ordering,
        active_learning=active_learning,
        lease_seconds=lease_seconds,
        cleaning=cleaning,
        label_descriptions=label_description,
    )
    show_one(ctx, lambda gm: gm.labeling.CreateProject(request), project_fields, as_json)


@projects_app.command("show")
@one_line_errors
def projects_show(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """One project with its schema and counts."""
    request = lb.GetProjectRequest(project_id=project_id)
    show_one(ctx, lambda gm: gm.labeling.GetProject(request), project_fields, as_json)


@projects_app.command("update")
@one_line_errors
def projects_update(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    name: str | None = typer.Option(None, "--name", help="new display name"),
    description: str | None = typer.Option(None, help="new description"),
    annotators: int | None = typer.Option(None, min=1, help="annotations needed per item"),
    ordering: str | None = typer.Option(None, help="task order: sequential, random or uncertainty"),
    lease_seconds: int | None = typer.Option(None, "--lease-seconds", min=0, max=86400, help="task lease length"),
    active_learning: bool | None = typer.Option(
        None, "--active-learning/--no-active-learning", help="uncertain predictions become items"
    ),
    max_text_chars: int | None = MAX_TEXT_CHARS_OPTION,
    near_duplicates: str | None = NEAR_DUPLICATES_OPTION,
    near_duplicate_threshold: float | None = NEAR_DUPLICATE_THRESHOLD_OPTION,
    pii_kinds: str | None = PII_KINDS_OPTION,
    pii_pattern: list[str] = PII_PATTERN_OPTION,
    store_raw_text: bool | None = STORE_RAW_TEXT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a project's name, description or settings, cleaning and PII included (only what the options name;
    label descriptions: `set-labels`)."""
    project = lb.Project()
    paths: list[str] = []
    if name is not None:
        project.display_name = name
        paths.append("display_name")
    if description is not None:
        project.description = description
        paths.append("description")
    if annotators is not None:
        project.settings.annotations_per_item = annotators
        paths.append("settings.annotations_per_item")
    if ordering is not None:
        project.settings.task_ordering = choice(ordering, ORDERINGS, "--ordering")
        paths.append("settings.task_ordering")
    if lease_seconds is not None:
        project.settings.lease_seconds = lease_seconds
        paths.append("settings.lease_seconds")
    if active_learning is not None:
        project.settings.active_learning.import_uncertain_predictions = active_learning
        paths.append("settings.active_learning")
    cleaning, cleaning_paths = cleaning_settings(
        max_text_chars=max_text_chars,
        near_duplicates=near_duplicates,
        near_duplicate_threshold=near_duplicate_threshold,
        pii_kind_names=pii_kinds,
        pii_patterns=pii_pattern,
        store_raw_text=store_raw_text,
    )
    if cleaning_paths:
        project.settings.cleaning.CopyFrom(cleaning)
        paths.extend(cleaning_paths)
    if not paths:
        fail("nothing to change: give at least one option (see --help)", code=2)
    request = lb.UpdateProjectRequest(project_id=project_id, project=project)
    request.update_mask.paths.extend(paths)
    show_one(ctx, lambda gm: gm.labeling.UpdateProject(request), project_fields, as_json)


@projects_app.command("set-labels")
@one_line_errors
def projects_set_labels(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    labels: str = typer.Option(..., "--labels", help="the whole new label list, comma-separated, in class order"),
    label_description: list[str] = LABEL_DESCRIPTION_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a new label schema version current: labels may be added; used ones cannot be removed or renamed.

    Labels keep their descriptions unless --label-description gives a new one."""
    names = comma_list(labels)
    label_definitions(names, label_description)  # a bad description is a usage error before any call
    with state(ctx).client() as gm:
        current = gm.labeling.GetProject(lb.GetProjectRequest(project_id=project_id)).label_schema.labels
        schema = gm.labeling.UpdateLabelSchema(
            lb.UpdateLabelSchemaRequest(
                project_id=project_id, labels=label_definitions(names, label_description, current)
            )
        )
    fields = {"project": schema.project_id, "schema version": schema.version, "labels": ",".join(names)}
    emit_object(fields, want_json(ctx, as_json), raw=schema)


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
        names = comma_list(columns)
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
    path: Path = typer.Argument(..., help="a JSONL, CSV or TSV file (with --from-object: an object key)"),
    file_format: str = typer.Option("auto", "--format", help="jsonl, csv or tsv (auto: from the file name)"),
    delimiter: str = typer.Option("", help="CSV delimiter (default ',' for csv, tab for tsv)"),
    no_header: bool = typer.Option(False, "--no-header", help="the first CSV line is data"),
    columns: str = typer.Option("", help="column names for --no-header, e.g. text,label"),
    text_field: str = typer.Option("", help="field/column with the text (default 'text')"),
    label_field: str = typer.Option("", help="field/column with an existing label (default 'label')"),
    id_field: str = typer.Option("", help="field/column with the item id (default 'id')"),
    annotator: str = typer.Option("", help="existing labels become annotations by this annotator id"),
    request_id: str = typer.Option("", help="idempotency key: a retry with it imports nothing twice"),
    from_object: bool = typer.Option(
        False, "--from-object", help="FILE is a key in the platform's bucket: the labeling service reads it there"
    ),
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
        if from_object:
            report = gm.labeling.ImportItemsFromObject(
                lb.ImportItemsFromObjectRequest(options=options, object_key=path.as_posix())
            )
        else:
            report = import_file(gm, options, path)
    emit_object(report_fields(report), want_json(ctx, as_json), raw=report)


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
    request = lb.GetAgreementRequest(project_id=project_id)
    show_one(ctx, lambda gm: gm.labeling.GetAgreement(request), agreement_fields, as_json)


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
    request = lb.ListDatasetVersionsRequest(project_id=project_id)
    show_list(ctx, lambda gm: gm.labeling.ListDatasetVersions(request).dataset_versions, version_row, as_json)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
