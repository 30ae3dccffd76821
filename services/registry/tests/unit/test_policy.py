"""Promotion policies: the gate's arithmetic, automatic promotion with the decision in the alias history,
and manual approval (pending promotions, approve, reject, superseded)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.registry.domain.model import (
    AliasCause,
    Caller,
    FileRef,
    Lineage,
    Metric,
    MetricGoal,
    ModelVersion,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
    VersionStatus,
)
from gristmill.registry.domain.policy import evaluate
from services.registry.tests.support import CALLER, Env, register_ready

T = datetime(2026, 1, 1, tzinfo=UTC)


def _version(number: int, accuracy: float | None, loss: float | None = None) -> ModelVersion:
    metrics = []
    if accuracy is not None:
        metrics.append(Metric("accuracy", accuracy, "test"))
    if loss is not None:
        metrics.append(Metric("loss", loss, "test"))
    return ModelVersion(
        "default",
        "m",
        number,
        VersionStatus.READY,
        "",
        "",
        "",
        FileRef("k", "", 0),
        (),
        None,
        None,
        "",
        (),
        tuple(metrics),
        Lineage(),
        (),
        "",
        {},
        "t",
        T,
        T,
    )


def _policy(**overrides: object) -> PromotionPolicy:
    values: dict[str, object] = {
        "model_name": "m",
        "enabled": True,
        "target_alias": "production",
        "metric_name": "accuracy",
        "split": "test",
        "goal": MetricGoal.MAXIMIZE,
        "baseline_alias": "",
        "min_improvement": 0.005,
        "min_value": None,
        "mode": PromotionMode.AUTOMATIC,
    }
    values.update(overrides)
    return PromotionPolicy(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("candidate", "baseline", "policy", "passed", "explanation"),
    [
        (0.905, 0.900, {}, True, "accuracy/test 0.9050 >= 0.9000 + 0.005 (version 1)"),
        (0.904, 0.900, {}, False, "accuracy/test 0.9040 < 0.9000 + 0.005 (version 1)"),
        (0.900, 0.900, {"min_improvement": 0.0}, False, "accuracy/test 0.9000 >= 0.9000"),
        (0.901, 0.900, {"min_improvement": 0.0}, True, "accuracy/test 0.9010 > 0.9000"),
        (0.95, None, {}, True, "no baseline (alias 'production' is not set)"),
        (0.95, None, {"min_value": 0.96}, False, "required minimum 0.9600"),
        (None, 0.9, {}, False, "has no accuracy/test"),
    ],
)
def test_gate_arithmetic(
    candidate: float | None, baseline: float | None, policy: dict[str, object], passed: bool, explanation: str
) -> None:
    base = _version(1, baseline) if baseline is not None else None
    decision = evaluate(_policy(**policy), _version(2, candidate), base)
    assert decision.passed is passed
    assert explanation in decision.explanation
    if base is not None and candidate is not None:
        assert (decision.baseline_version, decision.baseline_value) == (1, baseline)


def test_minimize_goal_and_baseline_without_the_metric() -> None:
    policy = _policy(metric_name="loss", goal=MetricGoal.MINIMIZE, min_improvement=0.01)
    assert evaluate(policy, _version(2, None, loss=0.29), _version(1, None, loss=0.30)).passed
    assert not evaluate(policy, _version(2, None, loss=0.295), _version(1, None, loss=0.30)).passed
    no_metric = evaluate(_policy(), _version(2, 0.8), _version(1, None))
    assert no_metric.passed and no_metric.baseline_version is None and "has no accuracy/test" in no_metric.explanation


def _evaluate(env: Env, version: int) -> object:
    with env.store.transaction() as tx:
        return env.registry.promotions.evaluate_policy(tx, "default", "m", version)


def test_automatic_policy_promotes_and_records_the_decision(env: Env) -> None:
    register_ready(env, "m", accuracy=0.90)  # before the policy: never evaluated against it
    env.registry.promotions.set_policy(CALLER, _policy())
    assert _evaluate(env, 1) is None
    env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="baseline", expected=None)
    worse = register_ready(env, "m", accuracy=0.903)
    better = register_ready(env, "m", accuracy=0.91)
    assert not _evaluate(env, worse).passed  # type: ignore[attr-defined]
    assert _evaluate(env, better).passed  # type: ignore[attr-defined]
    assert _evaluate(env, better) is None  # already the target: nothing to do
    latest, _ = env.registry.promotions.alias_history(CALLER, "m", "production", 1, "")
    change = latest[0]
    assert (change.from_version, change.to_version, change.actor, change.cause) == (
        1,
        better,
        "policy",
        AliasCause.POLICY,
    )
    assert change.decision is not None and change.decision.baseline_value == 0.90 and change.decision.passed
    assert change.reason == "accuracy/test 0.9100 >= 0.9000 + 0.005 (version 1)"
    payloads = [p for _, p in env.events(events_pb2.AliasChanged)]
    assert payloads[-1].cause == registry_pb2.ALIAS_CHANGE_CAUSE_POLICY and payloads[-1].to_version == better
    assert len(payloads) == 2  # the manual baseline and the promotion; the failed gate emitted nothing


def test_manual_approval(env: Env) -> None:
    register_ready(env, "m", accuracy=0.80)
    env.registry.promotions.set_policy(CALLER, _policy(mode=PromotionMode.MANUAL_APPROVAL))
    v2 = register_ready(env, "m", accuracy=0.85)
    v3 = register_ready(env, "m", accuracy=0.86)
    _evaluate(env, v2)
    _evaluate(env, v3)  # a newer candidate supersedes the older proposal
    pending, _ = env.registry.promotions.list_pending(CALLER, "m", False, 0, "")
    assert [(p.version, p.from_version, p.state) for p in pending] == [(v3, None, PromotionState.PENDING)]
    everything, _ = env.registry.promotions.list_pending(CALLER, "", True, 0, "")
    assert [p.state for p in everything] == [PromotionState.SUPERSEDED, PromotionState.PENDING]
    assert env.registry.catalog.get_model(CALLER, "m").aliases == {}  # nothing moves before approval

    carol = Caller(actor="carol")
    approved = env.registry.promotions.approve(carol, pending[0].promotion_id, "looks good")
    assert (approved.state, approved.decided_by, approved.decision_reason) == (
        PromotionState.APPROVED,
        "carol",
        "looks good",
    )
    [change], _ = env.registry.promotions.alias_history(CALLER, "m", "production", 0, "")
    assert (change.to_version, change.actor, change.cause) == (v3, "carol", AliasCause.APPROVAL)
    assert change.decision is not None and change.decision.candidate_value == 0.86
    with pytest.raises(FailedPreconditionError, match="APPROVED, no longer PENDING"):
        env.registry.promotions.reject(carol, pending[0].promotion_id, "")

    # A proposal made stale by a manual move is SUPERSEDED when someone tries to approve it.
    v4 = register_ready(env, "m", accuracy=0.95)
    _evaluate(env, v4)
    [proposal], _ = env.registry.promotions.list_pending(CALLER, "m", False, 0, "")
    with env.store.transaction() as tx:  # move the alias behind the proposal's back, bypassing the supersede
        tx.lock_model("default", "m")
        tx.write_alias(
            "default",
            "m",
            "production",
            to_version=v2,
            actor="x",
            reason="",
            cause=AliasCause.MANUAL,
            decision=None,
            now=datetime.now(UTC),
        )
    with pytest.raises(FailedPreconditionError, match="SUPERSEDED"):
        env.registry.promotions.approve(carol, proposal.promotion_id, "")
    [stale], _ = env.registry.promotions.list_pending(CALLER, "m", True, 1, _token_after_first(env))
    assert stale.promotion_id == proposal.promotion_id and stale.state is PromotionState.SUPERSEDED


def _token_after_first(env: Env) -> str:
    _, token = env.registry.promotions.list_pending(CALLER, "m", True, 2, "")
    return token


def test_rejection_and_manual_moves_supersede(env: Env) -> None:
    register_ready(env, "m", accuracy=0.8)
    env.registry.promotions.set_policy(CALLER, _policy(mode=PromotionMode.MANUAL_APPROVAL))
    v2 = register_ready(env, "m", accuracy=0.9)
    _evaluate(env, v2)
    [p], _ = env.registry.promotions.list_pending(CALLER, "m", False, 0, "")
    rejected = env.registry.promotions.reject(Caller(actor="dan"), p.promotion_id, "not yet")
    assert (rejected.state, rejected.decided_by) == (PromotionState.REJECTED, "dan")
    assert env.registry.catalog.get_model(CALLER, "m").aliases == {}
    v3 = register_ready(env, "m", accuracy=0.95)
    _evaluate(env, v3)
    env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="manual", expected=None)
    assert env.registry.promotions.list_pending(CALLER, "m", False, 0, "")[0] == []


def test_policy_crud_and_bad_input(env: Env) -> None:
    register_ready(env, "m")
    stored = env.registry.promotions.set_policy(CALLER, _policy(min_value=0.5))
    assert env.registry.promotions.get_policy(CALLER, "m") == stored and stored.update_time is not None
    env.registry.promotions.delete_policy(CALLER, "m")
    for call, error, message in [
        (lambda: env.registry.promotions.get_policy(CALLER, "m"), NotFoundError, "has no promotion policy"),
        (lambda: env.registry.promotions.delete_policy(CALLER, "m"), NotFoundError, "has no promotion policy"),
        (
            lambda: env.registry.promotions.set_policy(CALLER, _policy(model_name="nope")),
            NotFoundError,
            "'nope' does not exist",
        ),
        (
            lambda: env.registry.promotions.set_policy(CALLER, _policy(target_alias="")),
            InvalidArgumentError,
            "target_alias",
        ),
        (
            lambda: env.registry.promotions.set_policy(CALLER, _policy(metric_name="")),
            InvalidArgumentError,
            "metric_name",
        ),
        (
            lambda: env.registry.promotions.set_policy(CALLER, _policy(baseline_alias="9x")),
            InvalidArgumentError,
            "alias",
        ),
        (
            lambda: env.registry.promotions.set_policy(CALLER, _policy(min_improvement=-1)),
            InvalidArgumentError,
            "min_improvement",
        ),
        (lambda: env.registry.promotions.approve(CALLER, "0" * 32, ""), NotFoundError, "does not exist"),
        (lambda: env.registry.promotions.reject(CALLER, "bad id!", ""), InvalidArgumentError, "promotion_id"),
    ]:
        with pytest.raises(error, match=message):
            call()
