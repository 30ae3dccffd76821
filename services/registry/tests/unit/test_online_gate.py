"""The promotion policy's online gate: floors-only offline gate, the first canary promoted at once, feedback
counted once per generation per canary window, promote or roll back by the named test (decision and numbers
in the alias history), a rolled-back version never re-aliased by the policy, and the settings' refusals."""

from __future__ import annotations

import uuid
from dataclasses import replace

import grpc
import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.events import Event
from gristmill.registry.domain.model import (
    AliasCause,
    FeedbackCount,
    Metric,
    MetricGoal,
    OnlineGate,
    OnlineTest,
    OutcomeCount,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
)
from gristmill.registry.domain.policy import ONLINE_METRIC, decide_online
from gristmill.registry.domain.promotion import Verdict
from gristmill.registry.domain.registration import Registration
from gristmill.registry.events.handlers import feedback_handler, verdict_of
from services.registry.tests.api import Api, fails
from services.registry.tests.support import CALLER, Env, draft, upload_model

GATE = OnlineGate(enabled=True, min_feedback=20, test=OnlineTest.TWO_PROPORTION_Z, alpha=0.05, max_rate_drop=0.05)


def _policy(**overrides: object) -> PromotionPolicy:
    values: dict[str, object] = {
        "model_name": "m",
        "enabled": True,
        "target_alias": "candidate",
        "metric_name": "json_valid",
        "split": "test",
        "goal": MetricGoal.MAXIMIZE,
        "baseline_alias": "production",
        "min_improvement": 0.0,
        "min_value": 0.5,
        "mode": PromotionMode.AUTOMATIC,
        "online_gate": GATE,
        "min_metrics": (Metric("json_match_sentiment", 0.6, "test"),),
    }
    values.update(overrides)
    return PromotionPolicy(**values)  # type: ignore[arg-type]


def _register(env: Env, **metrics: float) -> int:
    prefix = f"jobs/{uuid.uuid4().hex[:10]}"
    manifest = upload_model(env.objects, prefix)
    found = tuple(Metric(name, value, "test") for name, value in metrics.items())
    version, _ = env.registry.registrations.register_version(
        CALLER, Registration("m", True, draft(manifest, prefix, metrics=found)), wait=True
    )
    return version.version


def _evaluate(env: Env, version: int) -> PromotionDecision | None:
    with env.store.transaction() as tx:
        return env.registry.promotions.evaluate_policy(tx, "default", "m", version)


def _feedback(env: Env, version: int, positive: bool, request_id: str | None = None) -> PromotionDecision | None:
    verdict = Verdict(request_id or uuid.uuid4().hex, version, positive)
    with env.store.transaction() as tx:
        return env.registry.promotions.record_feedback(tx, "default", "m", verdict)


def _alias(env: Env, alias: str) -> int | None:
    with env.store.transaction() as tx:
        return tx.get_alias("default", "m", alias)


def _first_two_versions(env: Env) -> tuple[int, int]:
    """v1 reaches the floors and, with no production yet, becomes production at once; v2 goes on canary."""
    _register(env, json_valid=0.9, json_match_sentiment=0.8)  # before the policy: the model must exist
    env.registry.promotions.set_policy(CALLER, _policy())
    first = _register(env, json_valid=0.9, json_match_sentiment=0.8)
    decision = _evaluate(env, first)
    assert decision is not None and decision.passed
    assert (_alias(env, "candidate"), _alias(env, "production")) == (first, first)
    second = _register(env, json_valid=0.6, json_match_sentiment=0.7)  # worse offline: the floors are what count
    decision = _evaluate(env, second)
    assert decision is not None and decision.passed and decision.baseline_version is None
    assert "online gate compares it with 'production'" in decision.explanation
    assert (_alias(env, "candidate"), _alias(env, "production")) == (second, first)
    return first, second


@pytest.mark.parametrize(
    ("candidate", "baseline", "promoted"),
    [
        (FeedbackCount(8, 12), FeedbackCount(17, 3), False),  # 0.40 against 0.85: clearly worse
        (FeedbackCount(16, 4), FeedbackCount(17, 3), True),  # 0.80 against 0.85: within noise and the drop
        (FeedbackCount(20, 0), FeedbackCount(20, 0), True),  # no variance: the point estimates decide
        (FeedbackCount(0, 20), FeedbackCount(20, 0), False),
    ],
)
def test_the_two_proportion_z_test_rolls_back_only_a_significantly_worse_canary(
    candidate: FeedbackCount, baseline: FeedbackCount, promoted: bool
) -> None:
    decision = decide_online(GATE, candidate_version=2, candidate=candidate, baseline_version=1, baseline=baseline)
    assert decision is not None and decision.passed is promoted
    assert decision.metric_name == ONLINE_METRIC and decision.online is not None
    assert (decision.online.candidate_positive, decision.online.baseline_negative) == (
        candidate.positive,
        baseline.negative,
    )
    assert (decision.online.p_value >= 0.05) is promoted
    assert ("promoted" if promoted else "rolled back") in decision.explanation


def test_no_decision_before_both_versions_have_min_feedback_and_the_point_estimate_test() -> None:
    assert decide_online(GATE, candidate_version=2, candidate=FeedbackCount(19, 0), baseline_version=1,
                         baseline=FeedbackCount(0, 40)) is None  # fmt: skip
    point = OnlineGate(enabled=True, min_feedback=2, test=OnlineTest.POINT_ESTIMATE, max_rate_drop=0.1)
    kept = decide_online(point, candidate_version=2, candidate=FeedbackCount(3, 1), baseline_version=1,
                         baseline=FeedbackCount(4, 1))  # fmt: skip
    dropped = decide_online(point, candidate_version=2, candidate=FeedbackCount(2, 2), baseline_version=1,
                            baseline=FeedbackCount(4, 1))  # fmt: skip
    assert kept is not None and kept.passed and kept.online is not None and kept.online.z == 0.0
    assert dropped is not None and not dropped.passed


def test_a_candidate_below_a_floor_or_without_a_floor_metric_does_not_go_on_canary(env: Env) -> None:
    _register(env, json_valid=0.9)
    env.registry.promotions.set_policy(CALLER, _policy())
    missing = _register(env, json_valid=0.9)
    low = _register(env, json_valid=0.9, json_match_sentiment=0.5)
    first = _evaluate(env, missing)
    second = _evaluate(env, low)
    assert first is not None and not first.passed and "has no json_match_sentiment/test" in first.explanation
    assert second is not None and not second.passed and "0.5000 < required minimum 0.6000" in second.explanation
    assert _alias(env, "candidate") is None and _alias(env, "production") is None


def test_a_better_canary_is_promoted_with_the_numbers_in_the_alias_history(env: Env) -> None:
    first, second = _first_two_versions(env)
    for i in range(20):
        assert _feedback(env, first, positive=i < 14) is None  # 0.70
    for i in range(19):
        assert _feedback(env, second, positive=i < 17) is None
    decision = _feedback(env, second, positive=True)  # the 20th on the canary: 18/20 = 0.90
    assert decision is not None and decision.passed
    assert (_alias(env, "candidate"), _alias(env, "production")) == (second, second)
    history, _ = env.registry.promotions.alias_history(CALLER, "m", "production", 10, "")
    change = history[0]
    assert (change.from_version, change.to_version, change.cause, change.actor) == (
        first,
        second,
        AliasCause.ONLINE_GATE,
        "online-gate",
    )
    assert change.decision is not None and change.decision.online is not None
    assert (change.decision.online.candidate_positive, change.decision.online.baseline_positive) == (18, 14)
    assert f"0.900 (18/20) on version {second} against 0.700 (14/20) on version {first}" in change.reason
    first_change = history[1]  # the first version, promoted at once
    assert first_change.cause is AliasCause.ONLINE_GATE and "was not set" in first_change.reason
    payload = [p for _, p in env.events(events_pb2.AliasChanged)][-1]
    assert payload.cause == pb.ALIAS_CHANGE_CAUSE_ONLINE_GATE and payload.to_version == second
    # Promoted: both aliases at one version, so more feedback decides nothing.
    assert _feedback(env, second, positive=False) is None


def test_a_worse_canary_is_rolled_back_and_never_re_aliased_by_the_policy(env: Env) -> None:
    first, second = _first_two_versions(env)
    for i in range(20):
        _feedback(env, first, positive=i < 17)  # 0.85
    decisions = [_feedback(env, second, positive=i < 6) for i in range(20)]  # 0.30
    decision = decisions[-1]
    assert decisions[:-1] == [None] * 19
    assert decision is not None and not decision.passed and decision.online is not None
    assert decision.online.p_value < 0.05
    assert (_alias(env, "candidate"), _alias(env, "production")) == (first, first)
    history, _ = env.registry.promotions.alias_history(CALLER, "m", "candidate", 10, "")
    assert (history[0].to_version, history[0].cause) == (first, AliasCause.ONLINE_GATE)
    assert "rolled back" in history[0].reason
    version = env.registry.catalog.get_version(CALLER, "m", version=second, alias=None)
    assert "rolled back" in version.rolled_back_reason
    again = _evaluate(env, second)
    assert again is not None and not again.passed and "never aliases it again" in again.explanation
    assert _alias(env, "candidate") == first
    # A person still can.
    env.registry.promotions.set_alias(CALLER, "m", "candidate", second, reason="retry by hand", expected=None)
    assert _alias(env, "candidate") == second


def test_each_generation_counts_once_and_feedback_from_before_the_canary_moved_is_not_compared(env: Env) -> None:
    first, second = _first_two_versions(env)
    for _ in range(30):
        _feedback(env, second, positive=False, request_id="same-generation")  # one generation, one verdict
    with env.store.transaction() as tx:
        window = tx.latest_alias_change("default", "m", "candidate")
        assert window is not None
        counts = tx.online_feedback_counts("default", "m", window.sequence)
    assert counts == {second: FeedbackCount(0, 1)}
    _feedback(env, second, positive=True, request_id="same-generation")  # the latest word wins
    with env.store.transaction() as tx:
        assert tx.online_feedback_counts("default", "m", window.sequence) == {second: FeedbackCount(1, 0)}
    third = _register(env, json_valid=0.9, json_match_sentiment=0.9)
    _evaluate(env, third)  # a new canary: a new window, with nothing counted yet
    with env.store.transaction() as tx:
        moved = tx.latest_alias_change("default", "m", "candidate")
        assert moved is not None and moved.sequence != window.sequence
        assert tx.online_feedback_counts("default", "m", moved.sequence) == {}
    assert first != third


def test_feedback_without_an_online_gate_stores_nothing(env: Env) -> None:
    _register(env, json_valid=0.9)
    env.registry.promotions.set_policy(CALLER, _policy(online_gate=None))
    assert _feedback(env, 1, positive=True) is None
    with env.store.transaction() as tx:
        assert tx.online_feedback_counts("default", "m", 0) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"baseline_alias": ""}, "needs baseline_alias set and different from target_alias"),
        ({"baseline_alias": "candidate"}, "needs baseline_alias set and different from target_alias"),
        ({"online_gate": OnlineGate(enabled=True, min_feedback=0)}, "min_feedback must be 1 to"),
        ({"online_gate": OnlineGate(enabled=True, min_feedback=5, alpha=0.7)}, "alpha must be in (0, 0.5]"),
        ({"online_gate": OnlineGate(enabled=True, min_feedback=5, max_rate_drop=1.0)}, "max_rate_drop must be"),
        (
            {"online_gate": OnlineGate(enabled=True, min_feedback=5, max_error_rate_increase=-0.1)},
            "max_error_rate_increase must be",
        ),
        ({"min_metrics": (Metric("", 0.5, "test"),)}, "needs a metric name"),
        ({"min_metrics": (Metric("a", float("nan"), "test"),)}, "must be a finite number"),
        ({"min_metrics": (Metric("a", 0.5, "test"), Metric("a", 0.6, "test"))}, "names a/test twice"),
    ],
)
def test_bad_online_gate_settings_are_refused_and_store_nothing(
    env: Env, overrides: dict[str, object], message: str
) -> None:
    _register(env, json_valid=0.9)
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        env.registry.promotions.set_policy(CALLER, _policy(**overrides))
    with env.store.transaction() as tx:
        assert tx.get_policy("default", "m") is None


def _feedback_event(env: Env, model: str, version: int, kind: int, rating: int = 0, request_id: str = "r1") -> Event:
    org = ""
    message = events_pb2.FeedbackRecorded(
        organization_id=org,
        request_id=request_id,
        kind=kind,  # type: ignore[arg-type]
        rating=rating,
        generation=events_pb2.GenerationLogged(
            organization_id=org, request_id=request_id, registered_model_name=model, model_version=version
        ),
    )
    return Event.create(message, key=model, source="serving", catalog=env.catalog)


@pytest.mark.parametrize(
    ("kind", "rating", "positive"),
    [
        (events_pb2.FEEDBACK_KIND_THUMBS_UP, 0, True),
        (events_pb2.FEEDBACK_KIND_THUMBS_DOWN, 0, False),
        (events_pb2.FEEDBACK_KIND_REGENERATE, 0, False),
        (events_pb2.FEEDBACK_KIND_EDIT, 0, False),
        (events_pb2.FEEDBACK_KIND_RATING, 5, True),
        (events_pb2.FEEDBACK_KIND_RATING, 4, True),
        (events_pb2.FEEDBACK_KIND_RATING, 3, None),
        (events_pb2.FEEDBACK_KIND_RATING, 1, False),
        (events_pb2.FEEDBACK_KIND_TEXT, 0, None),
    ],
)
def test_what_each_kind_of_feedback_counts_for(kind: int, rating: int, positive: bool | None) -> None:
    message = events_pb2.FeedbackRecorded(
        request_id="r1",
        kind=kind,  # type: ignore[arg-type]
        rating=rating,
        generation=events_pb2.GenerationLogged(request_id="r1", registered_model_name="m", model_version=3),
    )
    verdict = verdict_of(message)
    assert (verdict.positive if verdict else None) is positive
    if verdict is not None:
        assert (verdict.request_id, verdict.version) == ("r1", 3)


def test_the_feedback_handler_counts_an_event_through_the_consumer_session(env: Env) -> None:
    first, second = _first_two_versions(env)
    handler = feedback_handler(env.registry.promotions, env.store, env.catalog)
    event = _feedback_event(env, "m", second, events_pb2.FEEDBACK_KIND_THUMBS_UP)
    with env.database.transaction() as session:
        handler(event, session)
    with env.store.transaction() as tx:
        window = tx.latest_alias_change("default", "m", "candidate")
        assert window is not None
        assert tx.online_feedback_counts("default", "m", window.sequence) == {second: FeedbackCount(1, 0)}
    assert first != second


async def test_the_policy_with_an_online_gate_round_trips_and_bad_values_are_invalid_argument(api: Api) -> None:
    s = api.stub
    await api.register("m", "jobs/p1", accuracy=0.80)
    policy = pb.PromotionPolicy(
        registered_model_name="m",
        enabled=True,
        target_alias="candidate",
        baseline_alias="production",
        metric_name="json_valid",
        online_gate=pb.OnlineGate(enabled=True, min_feedback=30, max_rate_drop=0.05),
        min_metrics=[common_pb2.Metric(name="json_match_sentiment", value=0.8)],
    )
    stored = await s.SetPromotionPolicy(pb.SetPromotionPolicyRequest(policy=policy))
    assert stored.online_gate.test == pb.ONLINE_TEST_TWO_PROPORTION_Z and stored.online_gate.alpha == 0.05
    assert stored.min_metrics[0].split == common_pb2.DATASET_SPLIT_TEST  # UNSPECIFIED means TEST
    assert (await s.GetPromotionPolicy(pb.GetPromotionPolicyRequest(registered_model_name="m"))) == stored
    bad = pb.PromotionPolicy()
    bad.CopyFrom(policy)
    bad.online_gate.alpha = -0.1
    await fails(s.SetPromotionPolicy(pb.SetPromotionPolicyRequest(policy=bad)), grpc.StatusCode.INVALID_ARGUMENT,
                "alpha must be in (0, 0.5]")  # fmt: skip
    bad.online_gate.alpha = 0.05
    bad.online_gate.test = 99  # type: ignore[assignment]
    await fails(s.SetPromotionPolicy(pb.SetPromotionPolicyRequest(policy=bad)), grpc.StatusCode.INVALID_ARGUMENT,
                "online_gate.test 99 is not a known value")  # fmt: skip
    assert (await s.GetPromotionPolicy(pb.GetPromotionPolicyRequest(registered_model_name="m"))) == stored


def test_more_errors_roll_the_canary_back_whatever_its_feedback() -> None:
    same = FeedbackCount(16, 4)
    erring = decide_online(
        GATE,
        candidate_version=2,
        candidate=same,
        baseline_version=1,
        baseline=same,
        candidate_outcomes=OutcomeCount(24, 6),
        baseline_outcomes=OutcomeCount(100, 0),
    )
    assert erring is not None and not erring.passed and erring.online is not None
    assert erring.online.error_p_value < 0.05 and "more errors: rolled back" in erring.explanation
    assert (erring.online.candidate_failed, erring.online.baseline_succeeded) == (6, 100)
    tolerant = replace(GATE, max_error_rate_increase=0.3)
    kept = decide_online(
        tolerant,
        candidate_version=2,
        candidate=same,
        baseline_version=1,
        baseline=same,
        candidate_outcomes=OutcomeCount(24, 6),
        baseline_outcomes=OutcomeCount(100, 0),
    )
    assert kept is not None and kept.passed
    untested = decide_online(GATE, candidate_version=2, candidate=same, baseline_version=1, baseline=same)
    assert untested is not None and untested.passed and untested.online is not None
    assert untested.online.error_p_value == 1.0


def test_reply_outcomes_are_counted_in_the_window_and_weigh_in_the_decision(env: Env) -> None:
    first, second = _first_two_versions(env)
    handler = feedback_handler(env.registry.promotions, env.store, env.catalog)
    for version, succeeded, failed in ((first, 60, 0), (second, 20, 8), (second, 2, 0)):
        event = Event.create(
            events_pb2.GenerationOutcomes(
                registered_model_name="m", model_version=version, succeeded=succeeded, failed=failed
            ),
            key="m",
            source="serving",
            catalog=env.catalog,
        )
        with env.database.transaction() as session:
            handler(event, session)
    with env.store.transaction() as tx:
        window = tx.latest_alias_change("default", "m", "candidate")
        assert window is not None
        assert tx.online_outcome_counts("default", "m", window.sequence) == {
            first: OutcomeCount(60, 0),
            second: OutcomeCount(22, 8),
        }
    for i in range(20):
        _feedback(env, first, positive=i < 15)
    decisions = [_feedback(env, second, positive=i < 16) for i in range(20)]  # better feedback, many errors
    decision = decisions[-1]
    assert decision is not None and not decision.passed and "more errors" in decision.explanation
    assert _alias(env, "candidate") == first
