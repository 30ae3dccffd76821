"""Promotion commands: ``models policy`` and ``models promotions`` (list, approve, reject what a policy proposed)."""

from __future__ import annotations

from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.cli.context import state, want_json
from gristmill.cli.options import JSON_OPTION, choice
from gristmill.cli.output import emit_object, enum_name, one_line_errors, when
from gristmill.cli.replies import show_list, show_one

promotions_app = typer.Typer(
    help="Promotions a --manual policy proposed: list, approve (moves the alias), reject.", no_args_is_help=True
)

SPLITS = {
    "test": common_pb2.DATASET_SPLIT_TEST,
    "validation": common_pb2.DATASET_SPLIT_VALIDATION,
    "train": common_pb2.DATASET_SPLIT_TRAIN,
}


def promotion_policy(
    name: str, *, alias: str, metric: str, split: str, min_value: float | None, min_improvement: float
) -> rg.PromotionPolicy:
    policy = rg.PromotionPolicy(
        registered_model_name=name,
        enabled=True,
        target_alias=alias,
        metric_name=metric,
        split=choice(split, SPLITS, "--split"),
        min_improvement=min_improvement,
        mode=rg.PROMOTION_MODE_AUTOMATIC,
    )
    if min_value is not None:
        policy.min_value = min_value
    return policy


ONLINE_TESTS = {"z": rg.ONLINE_TEST_TWO_PROPORTION_Z, "point": rg.ONLINE_TEST_POINT_ESTIMATE}


def with_online_gate(
    policy: rg.PromotionPolicy,
    *,
    baseline_alias: str,
    min_feedback: int,
    test: str = "z",
    alpha: float = 0.05,
    max_rate_drop: float = 0.0,
    max_error_rate_increase: float = 0.0,
) -> rg.PromotionPolicy:
    """``policy`` as a canary analysis: its alias is the canary's, promoted to ``baseline_alias`` or rolled back on
    production feedback (the registry checks the values)."""
    policy.baseline_alias = baseline_alias
    policy.online_gate.CopyFrom(
        rg.OnlineGate(
            enabled=True,
            min_feedback=min_feedback,
            test=choice(test, ONLINE_TESTS, "--online-test"),
            alpha=alpha,
            max_rate_drop=max_rate_drop,
            max_error_rate_increase=max_error_rate_increase,
        )
    )
    return policy


def parse_floors(floors: list[str], split: str) -> list[common_pb2.Metric]:
    """``--floor json_valid=0.95``: more metrics the candidate must reach (on ``split``)."""
    metrics = []
    for floor in floors:
        name, _, value = floor.partition("=")
        try:
            metrics.append(
                common_pb2.Metric(name=name.strip(), value=float(value), split=choice(split, SPLITS, "--split"))
            )
        except ValueError:
            raise typer.BadParameter(f"--floor {floor!r}: write METRIC=VALUE, e.g. json_valid=0.95") from None
    return metrics


@one_line_errors
def models_policy(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="registered model"),
    alias: str = typer.Option("production", help="alias the policy moves"),
    metric: str = typer.Option("accuracy", help="metric compared"),
    split: str = typer.Option("test", help="split the metric is measured on"),
    min_value: float | None = typer.Option(None, help="absolute floor the candidate must reach"),
    min_improvement: float = typer.Option(0.0, help="margin over the version the alias points to"),
    manual: bool = typer.Option(
        False, "--manual", help="propose promotions for approval (`models promotions`) instead of moving the alias"
    ),
    delete: bool = typer.Option(False, "--delete", help="remove the model's policy (pending promotions lapse)"),
    floor: list[str] = typer.Option([], "--floor", help="another metric floor, METRIC=VALUE (repeatable)"),
    canary_of: str = typer.Option(
        "",
        "--canary-of",
        help="online gate: ALIAS is a canary of this alias (e.g. production); production feedback promotes or "
        "rolls it back",
    ),
    min_feedback: int = typer.Option(30, help="online gate: feedback each version needs before it decides"),
    online_test: str = typer.Option("z", help="online gate: z (two-proportion z test) or point (rates alone)"),
    alpha: float = typer.Option(0.05, help="online gate: significance of the z test"),
    max_rate_drop: float = typer.Option(0.0, help="online gate: tolerated drop of the positive-feedback rate"),
    max_error_rate_increase: float = typer.Option(0.0, help="online gate: tolerated rise of the error rate"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Set a model's promotion policy (new READY versions that pass move the alias, or are proposed with --manual),
    or remove it with --delete."""
    if delete:
        with state(ctx).client() as gm:
            gm.registry.DeletePromotionPolicy(rg.DeletePromotionPolicyRequest(registered_model_name=name))
        emit_object({"model": name, "policy": "deleted"}, want_json(ctx, as_json))
        return
    policy = promotion_policy(
        name, alias=alias, metric=metric, split=split, min_value=min_value, min_improvement=min_improvement
    )
    if manual:
        policy.mode = rg.PROMOTION_MODE_MANUAL_APPROVAL
    policy.min_metrics.extend(parse_floors(floor, split))
    if canary_of:
        with_online_gate(
            policy,
            baseline_alias=canary_of,
            min_feedback=min_feedback,
            test=online_test,
            alpha=alpha,
            max_rate_drop=max_rate_drop,
            max_error_rate_increase=max_error_rate_increase,
        )
    with state(ctx).client() as gm:
        stored = gm.registry.SetPromotionPolicy(rg.SetPromotionPolicyRequest(policy=policy))
    fields = {
        "model": stored.registered_model_name,
        "alias": stored.target_alias,
        "gate": f"{stored.metric_name}/{split} "
        + (f">= {stored.min_value} and " if stored.HasField("min_value") else "")
        + f"beats the current one by > {stored.min_improvement}",
        "mode": enum_name(rg.PromotionMode.Name(stored.mode), "PROMOTION_MODE_"),
    }
    if stored.min_metrics:
        fields["floors"] = ", ".join(f"{m.name} >= {m.value:g}" for m in stored.min_metrics)
    if stored.online_gate.enabled:
        gate = stored.online_gate
        fields["gate"] = fields["gate"].split(" beats")[0] + " (floors only)"
        fields["online gate"] = (
            f"canary {stored.target_alias!r} of {stored.baseline_alias!r}: after {gate.min_feedback} feedback each, "
            f"{enum_name(rg.OnlineTest.Name(gate.test), 'ONLINE_TEST_').lower()} test at alpha {gate.alpha:g}, "
            f"drop <= {gate.max_rate_drop:g}, error rise <= {gate.max_error_rate_increase:g}"
        )
    emit_object(fields, want_json(ctx, as_json), raw=stored)


# --------------------------------------------------------------------------- promotions waiting for approval


def promotion_row(p: rg.PendingPromotion) -> dict[str, Any]:
    return {
        "promotion": p.promotion_id,
        "model": p.registered_model_name,
        "alias": p.target_alias,
        "move": (f"v{p.from_version}" if p.HasField("from_version") else "-") + f" -> v{p.version}",
        "state": enum_name(rg.PendingPromotionState.Name(p.state), "PENDING_PROMOTION_STATE_"),
        "decided by": p.decided_by,
        "reason": (p.decision_reason or p.decision.explanation)[:80],
        "created": when(p.create_time),
    }


@promotions_app.command("list")
@one_line_errors
def promotions_list(
    ctx: typer.Context,
    name: str = typer.Argument("", help="one registered model (default: all)"),
    include_decided: bool = typer.Option(False, "--include-decided", help="also approved, rejected, superseded"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Promotions waiting for approval, oldest first."""
    request = rg.ListPendingPromotionsRequest(registered_model_name=name, include_decided=include_decided)
    show_list(ctx, lambda gm: gm.registry.ListPendingPromotions(request).promotions, promotion_row, as_json)


@promotions_app.command("approve")
@one_line_errors
def promotions_approve(
    ctx: typer.Context,
    promotion_id: str = typer.Argument(...),
    reason: str = typer.Option("approved from the CLI", help="recorded in the alias history"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Approve a pending promotion: the alias moves (deployments following it hot-swap)."""
    request = rg.ApprovePromotionRequest(promotion_id=promotion_id, reason=reason)
    show_one(ctx, lambda gm: gm.registry.ApprovePromotion(request), promotion_row, as_json)


@promotions_app.command("reject")
@one_line_errors
def promotions_reject(
    ctx: typer.Context,
    promotion_id: str = typer.Argument(...),
    reason: str = typer.Option("rejected from the CLI", help="recorded with the promotion"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Reject a pending promotion; the alias does not move."""
    request = rg.RejectPromotionRequest(promotion_id=promotion_id, reason=reason)
    show_one(ctx, lambda gm: gm.registry.RejectPromotion(request), promotion_row, as_json)
