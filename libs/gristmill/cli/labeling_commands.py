"""Labeling commands: ``projects``, ``import``, ``label``, ``predictions attach``, ``agreement``, ``datasets``."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION, collect, more_hint
from gristmill.client import Gristmill

CHUNK_BYTES = 1024 * 1024
JSON_OPTION = typer.Option(False, "--json", help="print JSON")

projects_app = typer.Typer(help="Labeling projects.", no_args_is_help=True)
datasets_app = typer.Typer(help="Published dataset versions.", no_args_is_help=True)
items_app = typer.Typer(help="Items: list (e.g. the review queue), show, resolve.", no_args_is_help=True)
annotations_app = typer.Typer(help="Annotations: change one's labels.", no_args_is_help=True)
predictions_app = typer.Typer(
    help="Model predictions on items (shown to annotators as suggestions; uncertainty-first ordering uses them).",
    no_args_is_help=True,
)


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
) -> lb.CreateProjectRequest:
    orderings = ORDERINGS
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
            lease_seconds=lease_seconds,
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
    lease_seconds: int = LEASE_SECONDS_OPTION,
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
        lease_seconds=lease_seconds,
    )
    with state(ctx).client() as gm:
        project = gm.labeling.CreateProject(request)
    emit_object(project_fields(project), want_json(ctx, as_json), raw=project)


@projects_app.command("show")
@one_line_errors
def projects_show(ctx: typer.Context, project_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """One project with its schema and counts."""
    with state(ctx).client() as gm:
        project = gm.labeling.GetProject(lb.GetProjectRequest(project_id=project_id))
    emit_object(project_fields(project), want_json(ctx, as_json), raw=project)


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
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a project's name, description or settings (only what the options name)."""
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
        if ordering not in ORDERINGS:
            fail(f"--ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}", code=2)
        project.settings.task_ordering = ORDERINGS[ordering]
        paths.append("settings.task_ordering")
    if lease_seconds is not None:
        project.settings.lease_seconds = lease_seconds
        paths.append("settings.lease_seconds")
    if active_learning is not None:
        project.settings.active_learning.import_uncertain_predictions = active_learning
        paths.append("settings.active_learning")
    if not paths:
        fail("nothing to change: give at least one option (see --help)", code=2)
    request = lb.UpdateProjectRequest(project_id=project_id, project=project)
    request.update_mask.paths.extend(paths)
    with state(ctx).client() as gm:
        updated = gm.labeling.UpdateProject(request)
    emit_object(project_fields(updated), want_json(ctx, as_json), raw=updated)


@projects_app.command("set-labels")
@one_line_errors
def projects_set_labels(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    labels: str = typer.Option(..., "--labels", help="the whole new label list, comma-separated, in class order"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a new label schema version current: labels may be added; used ones cannot be removed or renamed."""
    names = [label.strip() for label in labels.split(",") if label.strip()]
    with state(ctx).client() as gm:
        schema = gm.labeling.UpdateLabelSchema(
            lb.UpdateLabelSchemaRequest(project_id=project_id, labels=[lb.LabelDefinition(name=n) for n in names])
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


# --------------------------------------------------------------------------- label


@dataclass(frozen=True)
class Suggestion:
    """What a model predicted for an item: shown to the annotator beside the choices."""

    label: str
    probability: float | None
    model: str


def suggestion(item: lb.Item) -> Suggestion | None:
    """The newest attached prediction's top label and its probability (None: the item has no prediction)."""
    if not item.predictions:
        return None
    newest = max(
        enumerate(item.predictions), key=lambda ip: (ip[1].create_time.seconds, ip[1].create_time.nanos, ip[0])
    )[1]
    probabilities = dict(newest.probabilities)
    if newest.labels:
        label = newest.labels[0]
    elif probabilities:
        label = max(probabilities, key=lambda name: probabilities[name])
    else:
        return None
    model = newest.model_name + (f" v{newest.model_version}" if newest.model_version else "")
    return Suggestion(label, probabilities.get(label), model)


def task_lines(task: lb.Task, remaining: int) -> list[str]:
    """What the annotator sees for one task: the text, the model's suggestion if any, and the choices."""
    labels = [label.name for label in task.label_schema.labels]
    lines = [f"\n[{remaining} left] {task.item.text}"]
    hint = suggestion(task.item)
    if hint is not None:
        probability = "" if hint.probability is None else f" (p={hint.probability:.2f})"
        number = f"{labels.index(hint.label) + 1}) " if hint.label in labels else ""
        lines.append(f"  suggested: {number}{hint.label}{probability} by {hint.model}")
    lines.append("  " + "  ".join(f"{i}) {name}" for i, name in enumerate(labels, 1)) + "  s) skip  q) quit")
    return lines


@one_line_errors
def label_command(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    annotator: str = typer.Option(..., help="your annotator id (a slug)"),
    limit: int = typer.Option(0, help="stop after this many answers (0: until nothing is left)"),
) -> None:
    """Label items in the terminal: answer with a label's number or name, 's' to skip, 'q' to quit.

    An item with an attached model prediction shows it as a suggestion, with its probability. Answers are read
    from stdin, one per line, so a file of answers can be piped in.
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
            for line in task_lines(task, reply.remaining_count):
                typer.echo(line)
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


# --------------------------------------------------------------------------- items and annotations

ITEM_STATUSES = {
    enum_name(name, "ITEM_STATUS_"): number
    for name, number in lb.ItemStatus.items()
    if number != lb.ITEM_STATUS_UNSPECIFIED
}


def item_row(i: lb.Item) -> dict[str, Any]:
    hint = suggestion(i)
    return {
        "item": i.item_id,
        "external id": i.external_id,
        "status": enum_name(lb.ItemStatus.Name(i.status), "ITEM_STATUS_"),
        "consensus": ",".join(i.consensus.labels),
        "suggested": "" if hint is None else hint.label,
        "text": i.text[:60],
    }


@items_app.command("list")
@one_line_errors
def items_list(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    status: list[str] = typer.Option([], "--status", help="unlabeled, labeled, conflict or resolved (repeatable)"),
    page_size: int = PAGE_SIZE_OPTION,
    page_token: str = PAGE_TOKEN_OPTION,
    every_page: bool = ALL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """A project's items in import order (``--status conflict``: the review queue)."""
    unknown = [s for s in status if s not in ITEM_STATUSES]
    if unknown:
        fail(f"--status must be one of {', '.join(ITEM_STATUSES)}, got {unknown[0]!r}", code=2)
    with state(ctx).client() as gm:

        def fetch(page: common_pb2.PageRequest) -> tuple[list[lb.Item], str]:
            reply = gm.labeling.ListItems(
                lb.ListItemsRequest(project_id=project_id, statuses=[ITEM_STATUSES[s] for s in status], page=page)
            )
            return list(reply.items), reply.next_page_token

        found, token = collect(fetch, page_size=page_size, page_token=page_token, every_page=every_page)
    emit_messages(found, item_row, want_json(ctx, as_json))
    more_hint(token)


@items_app.command("show")
@one_line_errors
def items_show(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    item_id: str = typer.Argument(...),
    as_json: bool = JSON_OPTION,
) -> None:
    """One item with its annotations (and their ids, for `annotations update`), predictions and consensus."""
    with state(ctx).client() as gm:
        item = gm.labeling.GetItem(lb.GetItemRequest(project_id=project_id, item_id=item_id))
    fields = {
        **item_row(item),
        "text": item.text,
        "annotations": "; ".join(f"{a.annotation_id} {a.annotator_id}: {','.join(a.labels)}" for a in item.annotations),
    }
    emit_object(fields, want_json(ctx, as_json), raw=item)


@items_app.command("resolve")
@one_line_errors
def items_resolve(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    item_id: str = typer.Argument(...),
    labels: str = typer.Option(..., "--labels", help="the final labels, comma-separated"),
    reviewer: str = typer.Option(..., help="your reviewer id (a slug)"),
    comment: str = typer.Option("", help="why"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Adjudicate an item: its final labels override the majority vote (the item becomes resolved)."""
    names = [label.strip() for label in labels.split(",") if label.strip()]
    with state(ctx).client() as gm:
        item = gm.labeling.ResolveItem(
            lb.ResolveItemRequest(
                project_id=project_id, item_id=item_id, reviewer_id=reviewer, labels=names, comment=comment
            )
        )
    emit_object(item_row(item), want_json(ctx, as_json), raw=item)


@annotations_app.command("update")
@one_line_errors
def annotations_update(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    annotation_id: str = typer.Argument(..., help="from `items show`"),
    annotator: str = typer.Option(..., help="the annotation's author (a slug)"),
    labels: str = typer.Option(..., "--labels", help="the new labels, comma-separated"),
    comment: str = typer.Option("", help="a note"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Replace an annotation's labels (the item's consensus is recomputed)."""
    names = [label.strip() for label in labels.split(",") if label.strip()]
    with state(ctx).client() as gm:
        annotation = gm.labeling.UpdateAnnotation(
            lb.UpdateAnnotationRequest(
                project_id=project_id,
                annotation_id=annotation_id,
                annotator_id=annotator,
                labels=names,
                comment=comment,
            )
        )
    fields = {
        "annotation": annotation.annotation_id,
        "item": annotation.item_id,
        "annotator": annotation.annotator_id,
        "labels": ",".join(annotation.labels),
        "updated": when(annotation.update_time),
    }
    emit_object(fields, want_json(ctx, as_json), raw=annotation)


# --------------------------------------------------------------------------- predictions

MAX_PREDICTIONS_PER_CALL = 10_000  # AttachPredictions' own limit


def prediction_inputs(path: Path, model: str, version: int) -> list[lb.PredictionInput]:
    """Predictions from a JSONL file, one item per line::

        {"external_id": "r-17", "label": "positive", "probabilities": {"positive": 0.83, "negative": 0.17}}

    The item by ``item_id`` or ``external_id`` (``id`` is read as the external id); the predicted labels as
    ``label`` or ``labels``, or else the most probable one; ``model`` / ``model_version`` per line override the
    options. A bad line is a usage error naming its number, before anything is sent.
    """
    if not path.is_file():
        fail(f"{path}: no such file", code=2)
    inputs: list[lb.PredictionInput] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                inputs.append(prediction_input(json.loads(line), model, version))
            except (ValueError, TypeError) as exc:
                fail(f"{path.name} line {number}: {exc}", code=2)
    if not inputs:
        fail(f"{path}: no predictions in the file", code=2)
    return inputs


def prediction_input(row: Any, model: str, version: int) -> lb.PredictionInput:
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    probabilities = row.get("probabilities", {})
    if not isinstance(probabilities, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in probabilities.values()
    ):
        raise ValueError('"probabilities" must be an object of label: number')
    labels = row.get("labels", [row["label"]] if "label" in row else [])
    if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        raise ValueError('"labels" must be a list of label names ("label": one name)')
    if not labels and probabilities:
        labels = [max(probabilities, key=lambda name: probabilities[name])]
    if not labels:
        raise ValueError('no prediction: give "label", "labels" or "probabilities"')
    model_name = row.get("model", model)
    model_version = row.get("model_version", version)
    if not model_name or not isinstance(model_name, str):
        raise ValueError('no model: give --model or "model" on the line')
    if not isinstance(model_version, int) or isinstance(model_version, bool) or model_version < 0:
        raise ValueError('"model_version" must be a whole number >= 0')
    prediction = lb.Prediction(
        model_name=model_name,
        model_version=model_version,
        labels=labels,
        probabilities={str(k): float(v) for k, v in probabilities.items()},
    )
    if "item_id" in row:
        return lb.PredictionInput(item_id=str(row["item_id"]), prediction=prediction)
    external = row.get("external_id", row.get("id"))
    if external is None or external == "":
        raise ValueError('no item: give "item_id" or "external_id" (or "id")')
    return lb.PredictionInput(external_id=str(external), prediction=prediction)


def batches(inputs: Sequence[lb.PredictionInput], size: int) -> Iterator[Sequence[lb.PredictionInput]]:
    for start in range(0, len(inputs), size):
        yield inputs[start : start + size]


@predictions_app.command("attach")
@one_line_errors
def predictions_attach(
    ctx: typer.Context,
    project_id: str = typer.Argument(..., help="project whose items the predictions are for"),
    path: Path = typer.Argument(..., help="JSONL: one prediction per line (see below)"),
    model: str = typer.Option("", help="model that made the predictions (unless each line names it)"),
    model_version: int = typer.Option(0, "--model-version", min=0, help="its version (unless each line says)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Attach model predictions to items: annotators see them as suggestions (`gristmill label`).

    Each line: {"external_id": "r-17" (or "item_id"), "label": "positive" (or "labels": [...]),
    "probabilities": {"positive": 0.83, "negative": 0.17}}. A newer prediction of the same model version
    replaces the item's earlier one. Each call of 10,000 lines is all-or-nothing.
    """
    inputs = prediction_inputs(path, model, model_version)
    attached = 0
    with state(ctx).client() as gm:
        for batch in batches(inputs, MAX_PREDICTIONS_PER_CALL):
            reply = gm.labeling.AttachPredictions(
                lb.AttachPredictionsRequest(project_id=project_id, predictions=list(batch))
            )
            attached += reply.attached_count
    fields = {"project": project_id, "attached": attached, "lines": len(inputs)}
    emit_object(fields, want_json(ctx, as_json))


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
