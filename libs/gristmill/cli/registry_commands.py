"""Registry commands: ``models`` (list, versions, show card, alias set/history, promotion policy)."""

from __future__ import annotations

from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.cli.context import state, want_json
from gristmill.cli.output import emit_messages, emit_object, enum_name, fail, one_line_errors, when
from gristmill.cli.training_commands import metric_text

JSON_OPTION = typer.Option(False, "--json", help="print JSON")

models_app = typer.Typer(help="Registered models, versions, aliases and model cards.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases (production, staging, ...) and their history.", no_args_is_help=True)
models_app.add_typer(alias_app, name="alias")


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
    as_json: bool = JSON_OPTION,
) -> None:
    """Registered models, by name."""
    with state(ctx).client() as gm:
        reply = gm.registry.SearchRegisteredModels(rg.SearchRegisteredModelsRequest(name_prefix=prefix))
    emit_messages(reply.registered_models, model_row, want_json(ctx, as_json))


@models_app.command("versions")
@one_line_errors
def models_versions(ctx: typer.Context, name: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """A model's versions, newest first, with test metrics and lineage."""
    with state(ctx).client() as gm:
        reply = gm.registry.ListModelVersions(rg.ListModelVersionsRequest(registered_model_name=name))
    emit_messages(reply.model_versions, version_row, want_json(ctx, as_json))


@models_app.command("show")
@one_line_errors
def models_show(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    version: int = typer.Option(0, help="version number (default: the latest READY one)"),
    alias: str = typer.Option("", help="the version this alias points to"),
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
    if want_json(ctx, as_json):
        emit_object({}, True, raw=card)
        return
    emit_object(version_row(chosen), False)
    typer.echo("")
    typer.echo(card.markdown.rstrip())


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
    with state(ctx).client() as gm:
        reply = gm.registry.SetAlias(
            rg.SetAliasRequest(registered_model_name=name, alias=alias, version=version, reason=reason)
        )
    fields = {**change_row(reply.change), "changed": reply.changed}
    emit_object(fields, want_json(ctx, as_json), raw=reply)


@alias_app.command("history")
@one_line_errors
def alias_history(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    alias: str = typer.Option("", help="one alias (default: all)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Every move of a model's aliases, newest first, with who and why."""
    with state(ctx).client() as gm:
        reply = gm.registry.GetAliasHistory(rg.GetAliasHistoryRequest(registered_model_name=name, alias=alias))
    emit_messages(reply.changes, change_row, want_json(ctx, as_json))


def promotion_policy(
    name: str, *, alias: str, metric: str, split: str, min_value: float | None, min_improvement: float
) -> rg.PromotionPolicy:
    splits = {
        "test": common_pb2.DATASET_SPLIT_TEST,
        "validation": common_pb2.DATASET_SPLIT_VALIDATION,
        "train": common_pb2.DATASET_SPLIT_TRAIN,
    }
    if split not in splits:
        fail(f"--split must be one of {', '.join(splits)}, got {split!r}", code=2)
    policy = rg.PromotionPolicy(
        registered_model_name=name,
        enabled=True,
        target_alias=alias,
        metric_name=metric,
        split=splits[split],
        min_improvement=min_improvement,
        mode=rg.PROMOTION_MODE_AUTOMATIC,
    )
    if min_value is not None:
        policy.min_value = min_value
    return policy


@models_app.command("policy")
@one_line_errors
def models_policy(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    alias: str = typer.Option("production", help="alias the policy moves"),
    metric: str = typer.Option("accuracy", help="metric compared"),
    split: str = typer.Option("test", help="split the metric is measured on"),
    min_value: float | None = typer.Option(None, help="absolute floor the candidate must reach"),
    min_improvement: float = typer.Option(0.0, help="margin over the version the alias points to"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Set a model's automatic promotion policy (new READY versions that pass move the alias)."""
    policy = promotion_policy(
        name, alias=alias, metric=metric, split=split, min_value=min_value, min_improvement=min_improvement
    )
    with state(ctx).client() as gm:
        stored = gm.registry.SetPromotionPolicy(rg.SetPromotionPolicyRequest(policy=policy))
    fields = {
        "model": stored.registered_model_name,
        "alias": stored.target_alias,
        "gate": f"{stored.metric_name}/{split} "
        + (f">= {stored.min_value} and " if stored.HasField("min_value") else "")
        + f"beats the current one by > {stored.min_improvement}",
    }
    emit_object(fields, want_json(ctx, as_json), raw=stored)
