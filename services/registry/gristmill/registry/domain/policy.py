"""Promotion gates: is a candidate version good enough to move an alias to it? Pure functions."""

from __future__ import annotations

from gristmill.registry.domain.model import MetricGoal, ModelVersion, PromotionDecision, PromotionPolicy

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
