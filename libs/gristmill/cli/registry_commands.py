"""Registry commands: ``models`` (list, create, versions, show, update, register), its ``alias`` and ``card``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.cli.context import state, want_json
from gristmill.cli.options import JSON_OPTION, comma_list, message_from_json_file
from gristmill.cli.output import emit_object, enum_name, fail, one_line_errors, when
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION
from gristmill.cli.promotion_commands import models_policy, promotions_app
from gristmill.cli.replies import show_list, show_one, show_pages
from gristmill.cli.training_commands import metric_text
from gristmill.client import Gristmill

models_app = typer.Typer(help="Registered models, versions, aliases and model cards.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases (production, staging, ...) and their history.", no_args_is_help=True)
card_app = typer.Typer(help="Model cards: show one, edit its free-text fields.", no_args_is_help=True)
models_app.add_typer(alias_app, name="alias")
models_app.add_typer(card_app, name="card")
models_app.add_typer(promotions_app, name="promotions")


VERSION_OPTION = typer.Option(0, help="version number (default: the latest READY one)")
ALIAS_OPTION = typer.Option("", help="the version this alias points to")


def selector(version: int, alias: str) -> common_pb2.ModelVersionSelector:
    if version and alias:
        fail("give --version or --alias, not both", code=2)
    if version:
        return common_pb2.ModelVersionSelector(version=version)
    if alias:
        return common_pb2.ModelVersionSelector(alias=alias)
    return common_pb2.ModelVersionSelector()


def model_row(m: rg.RegisteredModel) -> dict[str, Any]:
    return {
        "model": m.name,
        "task": enum_name(common_pb2.TaskType.Name(m.task), "TASK_TYPE_"),
        "labels": ",".join(m.label_map.labels),
        "latest": m.latest_version,
        "aliases": ",".join(f"{a}=v{v}" for a, v in sorted(m.aliases.items())),
        "created": when(m.create_time),
    }


def version_row(v: rg.ModelVersion) -> dict[str, Any]:
    lineage = v.lineage
    return {
        "version": v.version,
        "status": enum_name(rg.ModelVersionStatus.Name(v.status), "MODEL_VERSION_STATUS_"),
        "aliases": ",".join(v.aliases),
        "metrics": metric_text(m for m in v.metrics if m.split == common_pb2.DATASET_SPLIT_TEST),
        "dataset": f"{lineage.dataset_version.project_id}/{lineage.dataset_version.dataset_version_id}".strip("/"),
        "job": lineage.training_job_id,
        "created": when(v.create_time),
    }


def change_row(c: rg.AliasChange) -> dict[str, Any]:
    return {
        "seq": c.sequence,
        "alias": c.alias,
        "from": f"v{c.from_version}" if c.HasField("from_version") else "-",
        "to": f"v{c.to_version}" if c.HasField("to_version") else "(deleted)",
        "cause": enum_name(rg.AliasChangeCause.Name(c.cause), "ALIAS_CHANGE_CAUSE_"),
        "actor": c.actor,
        "reason": (c.decision.explanation or c.reason)[:80],
        "time": when(c.change_time),
    }


@models_app.command("list")
@one_line_errors
def models_list(
    ctx: typer.Context,
    prefix: str = typer.Option("", help="names starting with this"),
    page_size: int = PAGE_SIZE_OPTION,
    page_token: str = PAGE_TOKEN_OPTION,
    every_page: bool = ALL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Registered models, by name (one page; ``--all`` for every page)."""

    def fetch(gm: Gristmill, page: common_pb2.PageRequest) -> tuple[Sequence[rg.RegisteredModel], str]:
        reply = gm.registry.SearchRegisteredModels(rg.SearchRegisteredModelsRequest(name_prefix=prefix, page=page))
        return reply.registered_models, reply.next_page_token

    show_pages(ctx, fetch, model_row, as_json, page_size=page_size, page_token=page_token, every_page=every_page)


@models_app.command("create")
@one_line_errors
def models_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model name (a slug)"),
    labels: str = typer.Option("", "--labels", help="comma-separated label names, in class order"),
    multi_label: bool = typer.Option(False, "--multi-label", help="a multi-label text classifier"),
    description: str = typer.Option("", help="free text"),
    tags: list[str] = typer.Option([], "--tag", help="KEY=VALUE, repeatable"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a registered model with no versions yet (training creates it on its first version otherwise)."""
    request = rg.CreateRegisteredModelRequest(
        name=name,
        description=description,
        task=(
            common_pb2.TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION
            if multi_label
            else common_pb2.TASK_TYPE_TEXT_CLASSIFICATION
        ),
        label_map=common_pb2.LabelMap(labels=comma_list(labels)),
        tags=parse_tags(tags),
    )
    show_one(ctx, lambda gm: gm.registry.CreateRegisteredModel(request), model_row, as_json)


def parse_tags(tags: list[str]) -> dict[str, str]:
    out = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key.strip():
            fail(f"--tag {tag!r}: expected KEY=VALUE", code=2)
        out[key.strip()] = value.strip()
    return out


@models_app.command("versions")
@one_line_errors
def models_versions(ctx: typer.Context, name: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """A model's versions, newest first, with test metrics and lineage."""
    request = rg.ListModelVersionsRequest(registered_model_name=name)
    show_list(ctx, lambda gm: gm.registry.ListModelVersions(request).model_versions, version_row, as_json)


@models_app.command("show")
@one_line_errors
def models_show(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    version: int = VERSION_OPTION,
    alias: str = ALIAS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """A version's model card (Markdown) and details."""
    with state(ctx).client() as gm:
        chosen = gm.registry.GetModelVersion(
            rg.GetModelVersionRequest(registered_model_name=name, selector=selector(version, alias))
        )
        card = gm.registry.GetModelCard(
            rg.GetModelCardRequest(
                registered_model_name=name, selector=common_pb2.ModelVersionSelector(version=chosen.version)
            )
        )
    emit_card(card, want_json(ctx, as_json), details=version_row(chosen))


models_app.command("policy")(models_policy)


@alias_app.command("set")
@one_line_errors
def alias_set(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    alias: str = typer.Argument(..., help="alias, e.g. production"),
    version: int = typer.Argument(..., help="version number"),
    reason: str = typer.Option("set from the CLI", help="recorded in the alias history"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Point an alias at a version (deployments following it hot-swap)."""
    request = rg.SetAliasRequest(registered_model_name=name, alias=alias, version=version, reason=reason)
    show_one(
        ctx, lambda gm: gm.registry.SetAlias(request), lambda r: {**change_row(r.change), "changed": r.changed}, as_json
    )


@alias_app.command("history")
@one_line_errors
def alias_history(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    alias: str = typer.Option("", help="one alias (default: all)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Every move of a model's aliases, newest first, with who and why."""
    request = rg.GetAliasHistoryRequest(registered_model_name=name, alias=alias)
    show_list(ctx, lambda gm: gm.registry.GetAliasHistory(request).changes, change_row, as_json)


@alias_app.command("delete")
@one_line_errors
def alias_delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    alias: str = typer.Argument(..., help="alias to remove"),
    reason: str = typer.Option("deleted from the CLI", help="recorded in the alias history"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove an alias (deployments following it keep serving the version they have)."""
    request = rg.DeleteAliasRequest(registered_model_name=name, alias=alias, reason=reason)
    show_one(ctx, lambda gm: gm.registry.DeleteAlias(request), change_row, as_json)


# --------------------------------------------------------------------------- model cards

# The editable fields, by the names people use (the card's Markdown headings) and the API's paths.
CARD_FIELDS = {
    "intended use": "intended_use",
    "limitations": "limitations",
    "ethical considerations": "ethical_considerations",
}
NOT_WRITTEN = "_Not written yet._"  # what the rendered card shows for an empty field


def card_text_from_file(path: Path) -> dict[str, str]:
    """The editable fields in a JSON object (``{"intended_use": "..."}``) or in Markdown: the text under the
    ``## Intended use``, ``## Limitations`` and ``## Ethical considerations`` headings (other sections, such as a
    whole ``model-card.md``'s generated ones, are read-only and ignored)."""
    if not path.is_file():
        fail(f"{path}: no such file", code=2)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"{path}: not JSON: {exc}", code=2)
        if not isinstance(data, dict) or not data:
            fail(f"{path}: expected a JSON object with {', '.join(CARD_FIELDS.values())}", code=2)
        unknown = sorted(set(data) - set(CARD_FIELDS.values()))
        if unknown:
            fail(
                f"{path}: {', '.join(unknown)} cannot be edited; the editable fields are "
                f"{', '.join(CARD_FIELDS.values())}",
                code=2,
            )
        if not all(isinstance(v, str) for v in data.values()):
            fail(f"{path}: every field's value must be a string", code=2)
        return dict(data)
    fields: dict[str, str] = {}
    current: str | None = None
    body: list[str] = []
    for line in [*text.splitlines(), "## (end)"]:
        heading = re.match(r"^##\s+(.+?)\s*#*\s*$", line)
        if heading:
            if current is not None:
                value = "\n".join(body).strip()
                fields[current] = "" if value == NOT_WRITTEN else value
            current = CARD_FIELDS.get(heading.group(1).strip().lower())
            body = []
        elif current is not None:
            body.append(line)
    if not fields:
        fail(f"{path}: no editable section; use '## Intended use', '## Limitations' or '## Ethical considerations'", 2)
    return fields


def version_number(gm: Gristmill, name: str, version: int, alias: str) -> int:
    """The version a selector names (the latest READY one when neither is given)."""
    if version and not alias:
        return version
    chosen = gm.registry.GetModelVersion(
        rg.GetModelVersionRequest(registered_model_name=name, selector=selector(version, alias))
    )
    return chosen.version


def emit_card(card: rg.ModelCard, as_json: bool, *, details: dict[str, Any] | None = None) -> None:
    """A model card's Markdown (after ``details``, when given), or with ``--json`` the whole card."""
    if as_json:
        emit_object({}, True, raw=card)
        return
    if details is not None:
        emit_object(details, False)
        typer.echo("")
    typer.echo(card.markdown.rstrip())


def card_fields(card: rg.ModelCard) -> dict[str, Any]:
    return {
        "model": card.registered_model_name,
        "version": card.version,
        "revision": card.revision,
        "intended use": card.intended_use[:80],
        "limitations": card.limitations[:80],
        "ethical considerations": card.ethical_considerations[:80],
        "updated by": card.updated_by,
        "updated": when(card.update_time),
    }


@card_app.command("show")
@one_line_errors
def card_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    version: int = VERSION_OPTION,
    alias: str = ALIAS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """A version's model card as Markdown (``--json``: every field)."""
    with state(ctx).client() as gm:
        card = gm.registry.GetModelCard(
            rg.GetModelCardRequest(registered_model_name=name, selector=selector(version, alias))
        )
    emit_card(card, want_json(ctx, as_json))


@card_app.command("edit")
@one_line_errors
def card_edit(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    version: int = VERSION_OPTION,
    alias: str = ALIAS_OPTION,
    intended_use: str | None = typer.Option(None, "--intended-use", help="what the model is for (Markdown)"),
    limitations: str | None = typer.Option(None, "--limitations", help="known limitations (Markdown)"),
    ethical_considerations: str | None = typer.Option(
        None, "--ethical-considerations", help="risks, biases, sensitive uses (Markdown)"
    ),
    from_file: Path | None = typer.Option(
        None,
        "--from-file",
        help="Markdown with '## Intended use' / '## Limitations' / '## Ethical considerations' sections "
        "(e.g. an edited model-card.md), or a .json object with those fields",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Edit a model card's free-text fields (only those given change); the card is re-rendered as a new revision.

    Training data, metrics and lineage are generated from the version and cannot be edited.
    """
    fields = card_text_from_file(from_file) if from_file is not None else {}
    options = {
        "intended_use": intended_use,
        "limitations": limitations,
        "ethical_considerations": ethical_considerations,
    }
    fields |= {path: value for path, value in options.items() if value is not None}
    if not fields:
        fail("nothing to change: give --intended-use, --limitations, --ethical-considerations or --from-file", 2)
    with state(ctx).client() as gm:
        number = version_number(gm, name, version, alias)
        card_edits = rg.ModelCard()
        for path, value in fields.items():
            setattr(card_edits, path, value)
        request = rg.UpdateModelCardRequest(registered_model_name=name, version=number, model_card=card_edits)
        request.update_mask.paths.extend(sorted(fields))
        card = gm.registry.UpdateModelCard(request)
    emit_object(card_fields(card), want_json(ctx, as_json), raw=card)


# --------------------------------------------------------------------------- descriptions, tags, registering


@models_app.command("update")
@one_line_errors
def models_update(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    version: int = typer.Option(0, min=0, help="change this version instead of the model"),
    description: str | None = typer.Option(None, help="new description"),
    tags: list[str] = typer.Option([], "--tag", help="KEY=VALUE, repeatable: the new tags (replace the old ones)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a registered model's (or one version's) description or tags."""
    paths = (["description"] if description is not None else []) + (["tags"] if tags else [])
    if not paths:
        fail("nothing to change: give --description or --tag", code=2)
    with state(ctx).client() as gm:
        if version:
            mv = rg.ModelVersion(description=description or "", tags=parse_tags(tags))
            request = rg.UpdateModelVersionRequest(registered_model_name=name, version=version, model_version=mv)
            request.update_mask.paths.extend(paths)
            updated_version = gm.registry.UpdateModelVersion(request)
            emit_object(version_row(updated_version), want_json(ctx, as_json), raw=updated_version)
            return
        rm = rg.RegisteredModel(description=description or "", tags=parse_tags(tags))
        model_request = rg.UpdateRegisteredModelRequest(name=name, registered_model=rm)
        model_request.update_mask.paths.extend(paths)
        updated = gm.registry.UpdateRegisteredModel(model_request)
    emit_object({**model_row(updated), "description": updated.description}, want_json(ctx, as_json), raw=updated)


@models_app.command("register")
@one_line_errors
def models_register(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    from_file: Path = typer.Option(
        ...,
        "--from-file",
        help="RegisterModelVersionRequest as JSON: source_prefix, manifest {key, sha256}, signature, task, "
        "label_map, metrics, lineage (artifacts already in the object store)",
    ),
    create_model: bool = typer.Option(False, "--create-model", help="create the registered model if missing"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="answer once the artifacts are verified"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a version from artifacts already in the object store (training jobs register theirs themselves)."""
    request = message_from_json_file(from_file, rg.RegisterModelVersionRequest(), what="a RegisterModelVersionRequest")
    request.registered_model_name = name
    request.create_model_if_missing = request.create_model_if_missing or create_model
    request.wait_for_verification = wait
    show_one(ctx, lambda gm: gm.registry.RegisterModelVersion(request), version_row, as_json)
