"""Promotion gates: is a candidate version good enough to move an alias to it? Pure functions.

The offline gate compares a version's recorded metrics; the online gate compares the canary's and the
baseline's production feedback (``decide_online``).
"""

from __future__ import annotations

import math

from gristmill.registry.domain.model import (
    FeedbackCount,
    MetricGoal,
    ModelVersion,
    OnlineComparison,
    OnlineGate,
    OnlineTest,
    OutcomeCount,
    PromotionDecision,
    PromotionPolicy,
)

ONLINE_METRIC = "positive_feedback_rate"
NO_OUTCOMES = OutcomeCount()

# Metric values come from float arithmetic; "0.905 >= 0.900 + 0.005" must pass although 0.9 + 0.005 is
# not exactly 0.905 in binary. Far below any meaningful metric difference.
_TOLERANCE = 1e-9


def metric_label(name: str, split: str) -> str:
    return f"{name}/{split}" if split else name


def evaluate(policy: PromotionPolicy, candidate: ModelVersion, baseline: ModelVersion | None) -> PromotionDecision:
    """Decide whether ``candidate`` passes ``policy``'s gate against ``baseline`` (the baseline alias's version).

    No baseline (alias not set, or its version lacks the metric) means the first candidate that has the
    metric, and reaches ``min_value`` if set, passes. With ``min_improvement == 0`` a tie does not pass.
    """
    label = metric_label(policy.metric_name, policy.split)
    maximize = policy.goal is MetricGoal.MAXIMIZE
    value = candidate.metric(policy.metric_name, policy.split)

    def decide(passed: bool, explanation: str, base_version: int | None, base_value: float | None) -> PromotionDecision:
        return PromotionDecision(
            metric_name=policy.metric_name,
            split=policy.split,
            candidate_version=candidate.version,
            candidate_value=value if value is not None else 0.0,
            baseline_version=base_version,
            baseline_value=base_value,
            min_improvement=policy.min_improvement,
            passed=passed,
            explanation=explanation,
        )

    if value is None:
        return decide(False, f"version {candidate.version} has no {label}; nothing to compare", None, None)
    if policy.min_value is not None:
        floor_ok = value >= policy.min_value - _TOLERANCE if maximize else value <= policy.min_value + _TOLERANCE
        if not floor_ok:
            relation = "<" if maximize else ">"
            return decide(False, f"{label} {value:.4f} {relation} required minimum {policy.min_value:.4f}", None, None)
    for floor in policy.min_metrics:
        missed = _missed_floor(floor.name, floor.split, floor.value, maximize, candidate)
        if missed:
            return decide(False, missed, None, None)
    if policy.online is not None:
        # The comparison with the baseline is the online gate's, on production traffic.
        floors = "" if policy.min_value is None and not policy.min_metrics else "; every floor reached"
        return decide(
            True,
            f"{label} {value:.4f}{floors}; the online gate compares it with {policy.effective_baseline_alias!r} "
            "on production feedback",
            None,
            None,
        )
    base_value = baseline.metric(policy.metric_name, policy.split) if baseline is not None else None
    if baseline is None or base_value is None:
        why = (
            f"alias {policy.effective_baseline_alias!r} is not set"
            if baseline is None
            else f"baseline version {baseline.version} has no {label}"
        )
        return decide(True, f"{label} {value:.4f}; no baseline ({why})", None, None)
    margin = policy.min_improvement
    if maximize:
        target = base_value + margin
        passed = value > base_value if margin == 0 else value >= target - _TOLERANCE
        relation = ">=" if passed else "<"
        sign = "+"
    else:
        target = base_value - margin
        passed = value < base_value if margin == 0 else value <= target + _TOLERANCE
        relation = "<=" if passed else ">"
        sign = "-"
    if margin == 0:
        relation = relation.rstrip("=") if passed else (">=" if maximize else "<=")
        explanation = f"{label} {value:.4f} {relation} {base_value:.4f} (version {baseline.version})"
    else:
        explanation = f"{label} {value:.4f} {relation} {base_value:.4f} {sign} {margin:g} (version {baseline.version})"
    return decide(passed, explanation, baseline.version, base_value)


def _missed_floor(name: str, split: str, floor: float, maximize: bool, candidate: ModelVersion) -> str:
    """Why ``candidate`` misses the floor on (name, split), or "" when it reaches it."""
    label = metric_label(name, split)
    value = candidate.metric(name, split)
    if value is None:
        return f"version {candidate.version} has no {label}; the policy requires it"
    if maximize and value < floor - _TOLERANCE:
        return f"{label} {value:.4f} < required minimum {floor:.4f}"
    if not maximize and value > floor + _TOLERANCE:
        return f"{label} {value:.4f} > required maximum {floor:.4f}"
    return ""


def decide_online(
    gate: OnlineGate,
    *,
    candidate_version: int,
    candidate: FeedbackCount,
    baseline_version: int,
    baseline: FeedbackCount,
    candidate_outcomes: OutcomeCount = NO_OUTCOMES,
    baseline_outcomes: OutcomeCount = NO_OUTCOMES,
) -> PromotionDecision | None:
    """Promote (passed) or roll back the canary, or None while either version has under ``min_feedback``.

    Two checks, each by the gate's test: the positive-feedback rate must not be below the baseline's minus
    ``max_rate_drop``, and (when both versions have counted replies) the error rate must not be above the
    baseline's plus ``max_error_rate_increase``. TWO_PROPORTION_Z makes each a one-sided test with the unpooled
    (Wald) standard error and rolls back only when one is rejected at ``alpha``: like a canary analysis, a version
    is kept unless the traffic shows it is worse. With no variance the point estimates decide. POINT_ESTIMATE
    compares the rates alone.
    """
    if candidate.total < gate.min_feedback or baseline.total < gate.min_feedback:
        return None
    z_test = gate.test is OnlineTest.TWO_PROPORTION_Z
    drop = gate.max_rate_drop
    z, p_value = _one_sided(
        candidate.rate - baseline.rate + drop, _binomial_variance(candidate) + _binomial_variance(baseline), z_test
    )
    worse_feedback = p_value < gate.alpha if z_test else p_value == 0.0
    error_p = 1.0
    tested_errors = candidate_outcomes.total > 0 and baseline_outcomes.total > 0
    if tested_errors:
        rise = gate.max_error_rate_increase
        _, error_p = _one_sided(
            baseline_outcomes.error_rate + rise - candidate_outcomes.error_rate,
            _error_variance(candidate_outcomes) + _error_variance(baseline_outcomes),
            z_test,
        )
    worse_errors = tested_errors and (error_p < gate.alpha if z_test else error_p == 0.0)
    passed = not worse_feedback and not worse_errors
    if z_test:
        test = f"z {z:.2f}, p {p_value:.4f} {'<' if worse_feedback else '>='} alpha {gate.alpha:g}"
    else:
        test = f"{candidate.rate:.3f} {'<' if worse_feedback else '>='} {baseline.rate:.3f} - {drop:g}"
    errors = ""
    if tested_errors:
        errors = (
            f"; errors {candidate_outcomes.error_rate:.3f} ({candidate_outcomes.failed}/{candidate_outcomes.total}) "
            f"against {baseline_outcomes.error_rate:.3f} ({baseline_outcomes.failed}/{baseline_outcomes.total})"
            + (f", p {error_p:.4f}" if z_test else "")
        )
    if passed:
        verdict = "not worse: promoted"
    elif worse_feedback:
        verdict = f"worse by more than {drop:g}: rolled back" if drop else "worse: rolled back"
    else:
        verdict = "more errors: rolled back"
    explanation = (
        f"positive feedback {candidate.rate:.3f} ({candidate.positive}/{candidate.total}) on version "
        f"{candidate_version} against {baseline.rate:.3f} ({baseline.positive}/{baseline.total}) on version "
        f"{baseline_version} ({test}){errors}: {verdict}"
    )
    return PromotionDecision(
        metric_name=ONLINE_METRIC,
        split="",
        candidate_version=candidate_version,
        candidate_value=candidate.rate,
        baseline_version=baseline_version,
        baseline_value=baseline.rate,
        min_improvement=0.0,
        passed=passed,
        explanation=explanation,
        online=OnlineComparison(
            test=gate.test,
            candidate_positive=candidate.positive,
            candidate_negative=candidate.negative,
            baseline_positive=baseline.positive,
            baseline_negative=baseline.negative,
            z=z,
            p_value=p_value,
            alpha=gate.alpha,
            max_rate_drop=drop,
            candidate_succeeded=candidate_outcomes.succeeded,
            candidate_failed=candidate_outcomes.failed,
            baseline_succeeded=baseline_outcomes.succeeded,
            baseline_failed=baseline_outcomes.failed,
            error_p_value=error_p,
            max_error_rate_increase=gate.max_error_rate_increase,
        ),
    )


def _one_sided(margin: float, variance: float, z_test: bool) -> tuple[float, float]:
    """(z, p) of "the true margin is >= 0" given the observed ``margin``: a small p says the canary is worse.

    Without the z test, or without variance, p is 0 for a negative margin and 1 otherwise (z 0).
    """
    if not z_test or variance <= 0:
        return 0.0, 0.0 if margin < -_TOLERANCE else 1.0
    z = margin / math.sqrt(variance)
    return z, 0.5 * math.erfc(-z / math.sqrt(2))


def _error_variance(count: OutcomeCount) -> float:
    return count.error_rate * (1 - count.error_rate) / count.total


def _binomial_variance(count: FeedbackCount) -> float:
    """The variance of ``count``'s positive rate (unpooled)."""
    return count.rate * (1 - count.rate) / count.total
