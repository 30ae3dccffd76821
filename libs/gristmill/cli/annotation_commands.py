"""Annotation commands: ``label`` (in the terminal), ``items``, ``annotations`` and ``predictions attach``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.cli.answers import AnswerError, Decision, EndOfInput, ask
from gristmill.cli.context import state, want_json
from gristmill.cli.conversations import (
    ask_conversation,
    consensus_text,
    conversation_lines,
    conversation_of,
    item_summary,
    parse_flags,
    parse_ranking,
    response_text,
)
from gristmill.cli.options import JSON_OPTION, choice, comma_list
from gristmill.cli.output import emit_object, enum_name, fail, one_line_errors, when
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION
from gristmill.cli.replies import show_one, show_pages
from gristmill.client import Gristmill
from gristmill.core.chat import CHAT_FLAGS, MAX_RATING, MIN_RATING

items_app = typer.Typer(help="Items: list (e.g. the review queue), show, resolve.", no_args_is_help=True)
annotations_app = typer.Typer(help="Annotations: change one's labels.", no_args_is_help=True)
predictions_app = typer.Typer(
    help="Model predictions on items (shown to annotators as suggestions; uncertainty-first ordering uses them).",
    no_args_is_help=True,
)


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


def parse_label(answer: str, labels: Sequence[str]) -> str | Decision:
    """A classification answer: a label's number or name, ``s`` (skip) or ``q`` (quit)."""
    text = answer.strip()
    if text.lower() in ("q", "quit"):
        return Decision.QUIT
    if text.lower() in ("s", "skip"):
        return Decision.SKIP
    if text.isdigit() and 1 <= int(text) <= len(labels):
        return labels[int(text) - 1]
    if text in labels:
        return text
    raise AnswerError(f"answer 1-{len(labels)}, a label name, s or q")


def ask_for_answer(task: lb.Task, remaining: int, *, styled: bool) -> str | lb.Response | Decision:
    """Show one task and read the annotator's answer: a label, or for a conversation (chat, preference) a response.
    ``EndOfInput`` when stdin ends first."""
    if task.item.WhichOneof("content") == "conversation":
        return ask_conversation(conversation_of(task.item.conversation), remaining, styled=styled)
    labels = [label.name for label in task.label_schema.labels]
    for line in task_lines(task, remaining):
        typer.echo(line)
    return ask("> ", lambda answer: parse_label(answer, labels))


@one_line_errors
def label_command(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    annotator: str = typer.Option(..., help="your annotator id (a slug)"),
    limit: int = typer.Option(0, help="stop after this many answers (0: until nothing is left)"),
) -> None:
    """Label items in the terminal, 's' to skip, 'q' to quit. Answers are read from stdin, one per line, so a
    file of answers can be piped in.

    Classification: a label's number or name; an item with an attached model prediction shows it as a
    suggestion, with its probability. Chat: Enter keeps the final assistant reply, 'e' rewrites it (lines up to
    one holding only '.'), then a rating 1-5 (Enter: unrated) and flags (comma-separated: unsafe, wrong,
    off-topic; Enter: none). Preference: the best candidate's number ('2'), a ranking best first ('2>1>3'), or
    't' for a tie.
    """
    done = skipped = 0
    styled = sys.stdout.isatty()
    with state(ctx).client() as gm:
        while not limit or done + skipped < limit:
            reply = gm.labeling.NextTask(lb.NextTaskRequest(project_id=project_id, annotator_id=annotator))
            if not reply.HasField("task"):
                typer.echo("nothing left to label")
                break
            task = reply.task
            try:
                answer = ask_for_answer(task, reply.remaining_count, styled=styled)
            except EndOfInput:
                break
            if answer is Decision.QUIT:
                break
            if answer is Decision.SKIP:
                gm.labeling.SkipTask(
                    lb.SkipTaskRequest(project_id=project_id, task_id=task.task_id, annotator_id=annotator)
                )
                skipped += 1
                continue
            request = lb.SubmitAnnotationRequest(
                project_id=project_id, item_id=task.item.item_id, annotator_id=annotator, task_id=task.task_id
            )
            if isinstance(answer, lb.Response):
                request.response.CopyFrom(answer)
            else:
                request.labels.append(answer)
            gm.labeling.SubmitAnnotation(request)
            done += 1
    typer.echo(f"labeled {done}, skipped {skipped}")


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
        "consensus": consensus_text(i),
        "suggested": "" if hint is None else hint.label,
        "text": item_summary(i),
    }


def annotation_text(annotation: lb.Annotation, reply_width: int = 40) -> str:
    """An annotation's answer on one line: its labels, or a chat or preference response."""
    return response_text(annotation.response, reply_width) or ",".join(annotation.labels)


# `items show`: a rewritten reply is shown at up to this length (the table of `items list` shows none).
SHOWN_REPLY_CHARS = 500


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
    statuses = [choice(s, ITEM_STATUSES, "--status") for s in status]

    def fetch(gm: Gristmill, page: common_pb2.PageRequest) -> tuple[Sequence[lb.Item], str]:
        reply = gm.labeling.ListItems(lb.ListItemsRequest(project_id=project_id, statuses=statuses, page=page))
        return reply.items, reply.next_page_token

    show_pages(ctx, fetch, item_row, as_json, page_size=page_size, page_token=page_token, every_page=every_page)


@items_app.command("show")
@one_line_errors
def items_show(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    item_id: str = typer.Argument(...),
    as_json: bool = JSON_OPTION,
) -> None:
    """One item with its annotations (and their ids, for `annotations update`), predictions and consensus; a chat
    or preference item with its conversation, turn by turn."""
    with state(ctx).client() as gm:
        item = gm.labeling.GetItem(lb.GetItemRequest(project_id=project_id, item_id=item_id))
    is_conversation = item.WhichOneof("content") == "conversation"
    fields = {
        **item_row(item),
        "text": item_summary(item) if is_conversation else item.text,
        "annotations": "; ".join(
            f"{a.annotation_id} {a.annotator_id}: {annotation_text(a, SHOWN_REPLY_CHARS)}" for a in item.annotations
        ),
    }
    if is_conversation:
        fields["resolution"] = response_text(item.resolved_response, SHOWN_REPLY_CHARS)
    as_json = want_json(ctx, as_json)
    emit_object(fields, as_json, raw=item)
    if is_conversation and not as_json:
        typer.echo("conversation:")
        for line in conversation_lines(conversation_of(item.conversation), styled=sys.stdout.isatty()):
            typer.echo(line)


FLAG_OPTION = typer.Option([], "--flag", help=f"chat: {', '.join(CHAT_FLAGS)} (repeatable)")


def resolution(
    labels: str, reply: str | None, rating: int | None, flags: Sequence[str], ranking: str, tie: bool
) -> tuple[list[str], lb.Response | None]:
    """A reviewer's verdict from ``items resolve``'s options: labels (classification), or a response: a reply,
    rating and flags (chat), or a ranking or a tie (preference). Mixing kinds, or giving none, is a usage error."""
    chat = reply is not None or rating is not None or bool(flags)
    preference = bool(ranking) or tie
    if sum(map(bool, (labels, chat, preference))) != 1:
        fail(
            "give --labels (classification), or --reply/--rating/--flag (chat), or --ranking/--tie (preference)",
            code=2,
        )
    if labels:
        return comma_list(labels), None
    if ranking and tie:
        fail("--ranking and --tie: give one", code=2)
    try:
        if preference:
            return [], lb.Response(ranking=parse_ranking(ranking) if ranking else [], tie=tie)
        return [], lb.Response(reply=reply or "", rating=rating or 0, flags=parse_flags(",".join(flags)))
    except AnswerError as exc:
        fail(f"{'--ranking' if preference else '--flag'}: {exc}", code=2)


@items_app.command("resolve")
@one_line_errors
def items_resolve(
    ctx: typer.Context,
    project_id: str = typer.Argument(...),
    item_id: str = typer.Argument(...),
    labels: str = typer.Option("", "--labels", help="classification: the final labels, comma-separated"),
    reply: str | None = typer.Option(None, "--reply", help="chat: the final assistant reply"),
    rating: int | None = typer.Option(
        None, "--rating", min=MIN_RATING, max=MAX_RATING, help=f"chat: the reply's rating, {MIN_RATING}-{MAX_RATING}"
    ),
    flag: list[str] = FLAG_OPTION,
    ranking: str = typer.Option(
        "", "--ranking", help="preference: candidates numbered from 1, best first ('2>1>3'; '2': the best)"
    ),
    tie: bool = typer.Option(False, "--tie", help="preference: no candidate is better than another"),
    reviewer: str = typer.Option(..., help="your reviewer id (a slug)"),
    comment: str = typer.Option("", help="why"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Adjudicate an item: its final labels, or for chat and preference items the winning reply or ranking,
    override the majority vote (the item becomes resolved)."""
    final_labels, response = resolution(labels, reply, rating, flag, ranking, tie)
    request = lb.ResolveItemRequest(
        project_id=project_id,
        item_id=item_id,
        reviewer_id=reviewer,
        labels=final_labels,
        comment=comment,
        response=response,
    )
    show_one(ctx, lambda gm: gm.labeling.ResolveItem(request), item_row, as_json)


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
    request = lb.UpdateAnnotationRequest(
        project_id=project_id,
        annotation_id=annotation_id,
        annotator_id=annotator,
        labels=comma_list(labels),
        comment=comment,
    )
    show_one(ctx, lambda gm: gm.labeling.UpdateAnnotation(request), annotation_fields, as_json)


def annotation_fields(annotation: lb.Annotation) -> dict[str, Any]:
    return {
        "annotation": annotation.annotation_id,
        "item": annotation.item_id,
        "annotator": annotation.annotator_id,
        "labels": annotation_text(annotation),
        "updated": when(annotation.update_time),
    }


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
