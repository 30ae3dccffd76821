"""Labeling commands: ``projects``, ``import``, ``agreement`` and ``datasets`` (annotating: ``annotation_commands``)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb

# Re-exported: tests/unit/test_cli_parsing.py imports them from here, where they were defined before the split.
from gristmill.cli.context import state, want_json
from gristmill.cli.options import JSON_OPTION, choice, comma_list
from gristmill.cli.output import emit, emit_object, enum_name, fail, fmt_float, one_line_errors, when
from gristmill.cli.project_settings import (
    FEEDBACK_OPTION,
    FEEDBACK_PREFERENCE_PROJECT_OPTION,
    FEEDBACK_REVIEW_AT_OR_BELOW_OPTION,
    LABEL_DESCRIPTION_OPTION,
    MAX_TEXT_CHARS_OPTION,
    MAX_TOKENS_OPTION,
    NEAR_DUPLICATE_THRESHOLD_OPTION,
    NEAR_DUPLICATES_OPTION,
    PII_KINDS_OPTION,
    PII_PATTERN_OPTION,
    STORE_RAW_TEXT_OPTION,
    TOKENIZER_OPTION,
    cleaning_fields,
    cleaning_settings,
    feedback_fields,
    feedback_settings,
    label_definitions,
)
from gristmill.cli.replies import show_list, show_one
from gristmill.client import Gristmill
from gristmill.core.chat import ROW_FORMAT_CLASSIFICATION, ROW_FORMAT_DPO
from gristmill.core.chat_formats import EXPORT_FORMATS, FORMAT_DPO, export_row
from gristmill.core.errors import GristmillError
from gristmill.core.tasks import (
    CHAT,
    CLASSIFICATION_TASK_TYPES,
    PREFERENCE,
    TEXT_CLASSIFICATION,
    TEXT_MULTI_LABEL_CLASSIFICATION,
    task_type_enum_name,
)

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
        **feedback_fields(settings.feedback),
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
    task: str = "",
    feedback: lb.FeedbackSettings | None = None,
) -> lb.CreateProjectRequest:
    """The request ``projects create`` sends. ``task``: one of ``PROJECT_TASKS`` ('' is text classification, or
    multi-label with ``multi_label``); chat and preference projects have no labels."""
    task_ordering = choice(ordering, ORDERINGS, "--ordering")
    return lb.CreateProjectRequest(
        project_id=project_id,
        display_name=name,
        description=description,
        task_type=project_task_type(task, multi_label=multi_label, labels=labels),
        labels=label_definitions(labels, label_descriptions or []),
        settings=lb.ProjectSettings(
            annotations_per_item=annotators,
            task_ordering=task_ordering,
            lease_seconds=lease_seconds,
            cleaning=cleaning,
            active_learning=lb.ActiveLearningSettings(import_uncertain_predictions=active_learning),
            feedback=feedback,
        ),
    )


# The task types a project can be created for (``gristmill.core.tasks`` names them).
PROJECT_TASKS = {
    name: common_pb2.TaskType.Value(task_type_enum_name(name))
    for name in (TEXT_CLASSIFICATION, TEXT_MULTI_LABEL_CLASSIFICATION, CHAT, PREFERENCE)
}
TASK_OPTION = typer.Option(
    "",
    "--task",
    help=f"task type: {', '.join(PROJECT_TASKS)} (default {TEXT_CLASSIFICATION}; chat and preference take no --labels)",
)


def project_task_type(task: str, *, multi_label: bool, labels: list[str]) -> common_pb2.TaskType.ValueType:
    """``--task`` (with ``--multi-label``, the older spelling of the multi-label task) as the API's task type; a
    classification project needs ``--labels`` (labels given to a chat or preference project: the service says no)."""
    name = task or (TEXT_MULTI_LABEL_CLASSIFICATION if multi_label else TEXT_CLASSIFICATION)
    task_type = choice(name, PROJECT_TASKS, "--task")
    if multi_label and name != TEXT_MULTI_LABEL_CLASSIFICATION:
        fail(f"--multi-label is for {TEXT_MULTI_LABEL_CLASSIFICATION} projects, not {name}", code=2)
    if name in CLASSIFICATION_TASK_TYPES and not labels:
        fail(f"--labels: a {name} project needs its label names, comma-separated", code=2)
    return task_type


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
    labels: str = typer.Option("", "--labels", help="comma-separated label names, in class order (classification)"),
    task: str = TASK_OPTION,
    project_id: str = typer.Option("", "--id", help="project id (slug)"),
    description: str = typer.Option("", help="free text"),
    multi_label: bool = typer.Option(False, "--multi-label", help="any number of labels per item"),
    annotators: int = typer.Option(1, help="annotations needed per item"),
    ordering: str = typer.Option("sequential", help="task order: sequential, random or uncertainty"),
    active_learning: bool = typer.Option(False, "--active-learning", help="uncertain predictions become items"),
    lease_seconds: int = LEASE_SECONDS_OPTION,
    label_description: list[str] = LABEL_DESCRIPTION_OPTION,
    max_text_chars: int | None = MAX_TEXT_CHARS_OPTION,
    max_tokens: int | None = MAX_TOKENS_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    near_duplicates: str | None = NEAR_DUPLICATES_OPTION,
    near_duplicate_threshold: float | None = NEAR_DUPLICATE_THRESHOLD_OPTION,
    pii_kinds: str | None = PII_KINDS_OPTION,
    pii_pattern: list[str] = PII_PATTERN_OPTION,
    store_raw_text: bool | None = STORE_RAW_TEXT_OPTION,
    feedback: bool | None = FEEDBACK_OPTION,
    feedback_preference_project: str | None = FEEDBACK_PREFERENCE_PROJECT_OPTION,
    feedback_review_at_or_below: int | None = FEEDBACK_REVIEW_AT_OR_BELOW_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a project: text classification (the default) with its labels, or chat or preference (no labels),
    with how imports are cleaned and PII masked."""
    cleaning, _ = cleaning_settings(
        max_text_chars=max_text_chars,
        max_tokens=max_tokens,
        tokenizer=tokenizer,
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
        task=task,
        feedback=feedback_settings(
            import_feedback=feedback,
            preference_project=feedback_preference_project,
            review_at_or_below=feedback_review_at_or_below,
        )[0],
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
    max_tokens: int | None = MAX_TOKENS_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    near_duplicates: str | None = NEAR_DUPLICATES_OPTION,
    near_duplicate_threshold: float | None = NEAR_DUPLICATE_THRESHOLD_OPTION,
    pii_kinds: str | None = PII_KINDS_OPTION,
    pii_pattern: list[str] = PII_PATTERN_OPTION,
    store_raw_text: bool | None = STORE_RAW_TEXT_OPTION,
    feedback: bool | None = FEEDBACK_OPTION,
    feedback_preference_project: str | None = FEEDBACK_PREFERENCE_PROJECT_OPTION,
    feedback_review_at_or_below: int | None = FEEDBACK_REVIEW_AT_OR_BELOW_OPTION,
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
        max_tokens=max_tokens,
        tokenizer=tokenizer,
        near_duplicates=near_duplicates,
        near_duplicate_threshold=near_duplicate_threshold,
        pii_kind_names=pii_kinds,
        pii_patterns=pii_pattern,
        store_raw_text=store_raw_text,
    )
    if cleaning_paths:
        project.settings.cleaning.CopyFrom(cleaning)
        paths.extend(cleaning_paths)
    feedback_values, feedback_paths = feedback_settings(
        import_feedback=feedback,
        preference_project=feedback_preference_project,
        review_at_or_below=feedback_review_at_or_below,
    )
    if feedback_paths:
        project.settings.feedback.CopyFrom(feedback_values)
        paths.extend(feedback_paths)
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
    pii = counts_text(report.pii_masked_by_kind)
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
        **({"records by format": counts_text(report.records_by_format)} if report.records_by_format else {}),
        "took": f"{report.duration_ms} ms",
    }


def counts_text(counts: Mapping[str, int]) -> str:
    """``{"sharegpt": 3, "openai": 10}`` → ``openai 10, sharegpt 3``."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


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
    fields: dict[str, Any] = {
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
    # chat and preference projects: the nominal statistics above are over accepted/rejected or the choices.
    if report.HasField("rating_krippendorff_alpha"):
        fields["rating krippendorff alpha"] = (
            f"{fmt_float(report.rating_krippendorff_alpha)} ({report.rated_item_count} rated items)"
        )
    if report.HasField("ranking_pair_agreement"):
        fields["ranking pair agreement"] = (
            f"{fmt_float(report.ranking_pair_agreement)} ({report.ranked_item_count} ranked items)"
        )
    return fields


@one_line_errors
def agreement_command(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """Agreement between annotators (Cohen's and Fleiss' kappa, Krippendorff's alpha); for chat projects also the
    ratings' alpha, for preference projects how often annotators order candidate pairs alike."""
    request = lb.GetAgreementRequest(project_id=project_id)
    show_one(ctx, lambda gm: gm.labeling.GetAgreement(request), agreement_fields, as_json)


# --------------------------------------------------------------------------- datasets


SPLITS = {
    enum_name(name, "DATASET_SPLIT_"): number
    for name, number in common_pb2.DatasetSplit.items()
    if number != common_pb2.DATASET_SPLIT_UNSPECIFIED
}


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


def dataset_version(gm: Gristmill, project_id: str, version: str) -> lb.DatasetVersion:
    """A project's dataset version by number (``3``), by id, or the newest one for 'latest'."""
    if version == "latest":
        reply = gm.labeling.ListDatasetVersions(
            lb.ListDatasetVersionsRequest(project_id=project_id, page=common_pb2.PageRequest(page_size=1))
        )
        if not reply.dataset_versions:
            fail(f"project {project_id!r} has no dataset version yet: publish one with `gristmill datasets publish`")
        return reply.dataset_versions[0]
    request = lb.GetDatasetVersionRequest(project_id=project_id)
    # A version number is short; an id is a 32-character hex string (which could be all digits).
    if version.isdigit() and len(version) <= MAX_VERSION_NUMBER_DIGITS:
        request.version_number = int(version)
    else:
        request.dataset_version_id = version
    return gm.labeling.GetDatasetVersion(request)


MAX_VERSION_NUMBER_DIGITS = 9
VERSION_ARGUMENT = typer.Argument(..., help="version number, dataset version id, or 'latest'")


def version_fields(v: lb.DatasetVersion) -> dict[str, Any]:
    """One dataset version in full (``datasets show``): the row, then what its rows are and how it was split."""
    splits = "; ".join(
        f"{enum_name(common_pb2.DatasetSplit.Name(s.split), 'DATASET_SPLIT_')} {s.item_count}"
        + (f" ({counts_text(s.item_count_by_label)})" if s.item_count_by_label else "")
        for s in v.splits
    )
    return {
        **version_row(v),
        "project": v.project_id,
        "task": enum_name(common_pb2.TaskType.Name(v.task_type), "TASK_TYPE_"),
        "row format": v.row_format or ROW_FORMAT_CLASSIFICATION,
        "schema version": v.schema_version,
        "splits": splits,
        "ratios": f"{v.ratios.train:g} / {v.ratios.validation:g} / {v.ratios.test:g}",
        "seed": v.seed,
        "strategy": enum_name(lb.SplitStrategy.Name(v.split_strategy), "SPLIT_STRATEGY_"),
        "content sha256": v.content_sha256,
        "manifest": v.manifest.key,
        "description": v.description,
    }


@datasets_app.command("show")
@one_line_errors
def datasets_show(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    version: str = VERSION_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """One dataset version: its splits (with counts per label, or per stratum for chat and preference), what a
    row is (row format), and how it was split."""
    with state(ctx).client() as gm:
        found = dataset_version(gm, project_id, version)
    emit_object(version_fields(found), want_json(ctx, as_json), raw=found)


# --------------------------------------------------------------------------- datasets export

# An export streams every file; it may take longer than one call's usual deadline.
EXPORT_TIMEOUT_S = 3600.0
STORED = "stored"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class ExportError(Exception):
    """A row that does not convert, or a file the stream did not deliver whole: one line saying which."""


RowConverter = Callable[[Mapping[str, Any], str], Mapping[str, Any]]


class JsonlRows:
    """Converts a split file's rows to ``fmt`` as its chunks arrive (a row may span chunks)."""

    def __init__(self, file_name: str, fmt: str, convert: RowConverter = export_row) -> None:
        self.file_name = file_name
        self.fmt = fmt
        self.convert = convert
        self._pending = b""
        self._line = 0

    def feed(self, data: bytes) -> bytes:
        *complete, self._pending = (self._pending + data).split(b"\n")
        return b"".join(self._row(line) for line in complete)

    def finish(self) -> bytes:
        last, self._pending = self._pending, b""
        return self._row(last)

    def _row(self, line: bytes) -> bytes:
        self._line += 1
        if not line.strip():
            return b""
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("a row must be a JSON object")
            converted = self.convert(row, self.fmt)
        except (ValueError, KeyError, TypeError, GristmillError) as exc:
            raise ExportError(f"{self.file_name} line {self._line}: {exc}") from None
        return (json.dumps(converted, ensure_ascii=False) + "\n").encode()


class ExportedFile:
    """One file of the stream, written to ``<name>.part`` and renamed into place once its last chunk arrived and
    the bytes match the sha256 and size the service sent (of the file as stored, before any conversion)."""

    def __init__(self, out_dir: Path, file_name: str, rows: JsonlRows | None) -> None:
        if not _FILE_NAME.match(file_name) or ".." in file_name:
            raise ExportError(f"the service sent a file named {file_name[:80]!r}, which is not a plain file name")
        self.name = file_name
        self.path = out_dir / file_name
        self.part = out_dir / f"{file_name}.part"
        self.rows = rows
        self._stored = hashlib.sha256()
        self._size = 0
        self._out = self.part.open("wb")

    def write(self, data: bytes) -> None:
        self._stored.update(data)
        self._size += len(data)
        self._out.write(self.rows.feed(data) if self.rows is not None else data)

    def finish(self, sha256: str, size: int) -> None:
        if self.rows is not None:
            self._out.write(self.rows.finish())
        self._out.close()
        if (sha256 and sha256 != self._stored.hexdigest()) or self._size != size:
            raise ExportError(f"{self.name}: the bytes received do not match the file's checksum; export again")
        self.part.replace(self.path)

    def discard(self) -> None:
        self._out.close()
        self.part.unlink(missing_ok=True)


def write_export(
    chunks: Iterable[lb.ExportDatasetChunk], out_dir: Path, fmt: str = "", convert: RowConverter = export_row
) -> list[dict[str, Any]]:
    """Write an export stream's files into ``out_dir``: as stored, or with ``fmt`` every split file's rows
    converted by ``convert`` (``manifest.json`` is always written as stored). Returns a row per file written."""
    written: list[dict[str, Any]] = []
    current: ExportedFile | None = None
    try:
        for chunk in chunks:
            if current is not None and chunk.file_name != current.name:
                raise ExportError(f"{current.name}: the stream moved on before the file's last chunk; export again")
            if current is None:
                converting = bool(fmt) and chunk.file_name.endswith(".jsonl")
                rows = JsonlRows(chunk.file_name, fmt, convert) if converting else None
                current = ExportedFile(out_dir, chunk.file_name, rows)
            current.write(chunk.data)
            if chunk.last_chunk:
                current.finish(chunk.sha256, chunk.size_bytes)
                converted = current.rows is not None
                written.append(
                    {
                        "file": str(current.path),
                        "format": fmt if converted else STORED,
                        "stored bytes": chunk.size_bytes,
                    }
                )
                current = None
        if current is not None:
            raise ExportError(f"{current.name}: the stream ended before the file's last chunk; export again")
    finally:
        if current is not None:
            current.discard()
    return written


@datasets_app.command("export")
@one_line_errors
def datasets_export(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    version: str = VERSION_ARGUMENT,
    out: Path | None = typer.Option(None, "--out", help="directory to write into (default PROJECT-vN)"),
    file_format: str = typer.Option(
        STORED,
        "--format",
        help=f"chat and preference versions: rows as {', '.join(EXPORT_FORMATS)}; {STORED}: the files as published",
    ),
    split: list[str] = typer.Option([], "--split", help="train, validation or test (repeatable; default all)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a directory that is not empty"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Download a dataset version's files: the split files (JSONL) and manifest.json, each checked against its
    sha256. --format converts a chat version's rows to OpenAI, Alpaca or ShareGPT records, a preference
    version's to DPO ones (or to a chat format: the prompt and the chosen reply); the manifest is written as
    published, so its checksums are those of the stored files."""
    fmt = "" if file_format == STORED else file_format
    if fmt and fmt not in EXPORT_FORMATS:
        fail(f"--format must be one of {', '.join((STORED, *EXPORT_FORMATS))}, got {file_format!r}", code=2)
    splits = [choice(name, SPLITS, "--split") for name in split]
    with state(ctx).client() as gm:
        found = dataset_version(gm, project_id, version)
        row_format = found.row_format or ROW_FORMAT_CLASSIFICATION
        if fmt and row_format == ROW_FORMAT_CLASSIFICATION:
            fail(
                f"--format {fmt}: version {found.version_number} of {project_id!r} is a classification dataset; "
                f"--format converts chat and preference rows (export it without --format)",
                code=2,
            )
        if fmt == FORMAT_DPO and row_format != ROW_FORMAT_DPO:
            fail(
                f"--format {fmt}: version {found.version_number} of {project_id!r} has {row_format} rows, no "
                f"preference pairs; export it as {', '.join(f for f in EXPORT_FORMATS if f != FORMAT_DPO)}",
                code=2,
            )
        target = out if out is not None else Path(f"{project_id}-v{found.version_number}")
        if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
            fail(f"--out {target}: not an empty directory; choose another, or pass --overwrite", code=2)
        target.mkdir(parents=True, exist_ok=True)
        request = lb.ExportDatasetRequest(
            project_id=project_id, dataset_version_id=found.dataset_version_id, splits=splits
        )
        try:
            written = write_export(gm.labeling.ExportDataset(request, timeout=EXPORT_TIMEOUT_S), target, fmt)
        except ExportError as exc:
            fail(str(exc))
    emit(written, want_json(ctx, as_json))


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
