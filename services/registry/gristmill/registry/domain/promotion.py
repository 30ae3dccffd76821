"""Aliases and their promotion: manual moves with compare-and-set, policies, and approvals.

Every alias change goes through ``move_alias``: under the model's lock it compares, checks the target,
appends the history entry, writes the ``alias changed`` event and supersedes the promotions waiting for
that alias, all in the caller's transaction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from gristmill.core import paging
from gristmill.core.errors import AbortedError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.ids import new_id, validate_id
from gristmill.registry.domain import names
from gristmill.registry.domain.common import numeric_page, require_model
from gristmill.registry.domain.model import (
    AliasCause,
    AliasChange,
    Caller,
    FeedbackCount,
    OutcomeCount,
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
    VersionStatus,
)
from gristmill.registry.domain.policy import decide_online, evaluate
from gristmill.registry.domain.ports import RegistryStore, RegistryTransaction

log = logging.getLogger(__name__)

POLICY_ACTOR = "policy"
ONLINE_GATE_ACTOR = "online-gate"
# Bounds of the policy's settings; beyond them a setting is a mistake, not a choice.
MAX_FLOORS = 16
MAX_MIN_FEEDBACK = 1_000_000


@dataclass(frozen=True)
class Verdict:
    """One generation's feedback as the online gate counts it."""

    request_id: str
    version: int
    positive: bool


class Promotions:
    """The aliases + promotion aggregate: what an alias points to, and the rules and approvals that move it."""

    def __init__(self, store: RegistryStore, *, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.clock = clock

    # ------------------------------------------------------------------------------------ aliases

    def set_alias(
        self, caller: Caller, name: str, alias: str, version: int, *, reason: str, expected: int | None
    ) -> tuple[AliasChange | None, bool]:
        """Point ``alias`` at ``version``. ``expected``: None = unconditional, 0 = only if unset, N = only if at N."""
        names.validate_model_name(name)
        names.validate_alias(alias)
        names.validate_version_number(version)
        names.validate_text(reason, what="reason", limit=2000)
        validate_expected(expected)
        with self.store.transaction() as tx:
            return self.move_alias(
                tx,
                caller.organization_id,
                name,
                alias,
                version,
                expected=expected,
                actor=caller.actor,
                reason=reason,
                cause=AliasCause.MANUAL,
                decision=None,
            )

    def delete_alias(self, caller: Caller, name: str, alias: str, *, reason: str, expected: int | None) -> AliasChange:
        names.validate_model_name(name)
        names.validate_alias(alias)
        names.validate_text(reason, what="reason", limit=2000)
        validate_expected(expected)
        with self.store.transaction() as tx:
            change, _ = self.move_alias(
                tx,
                caller.organization_id,
                name,
                alias,
                None,
                expected=expected,
                actor=caller.actor,
                reason=reason,
                cause=AliasCause.MANUAL,
                decision=None,
            )
        assert change is not None
        return change

    def move_alias(
        self,
        tx: RegistryTransaction,
        org: str,
        name: str,
        alias: str,
        to_version: int | None,
        *,
        expected: int | None,
        actor: str,
        reason: str,
        cause: AliasCause,
        decision: PromotionDecision | None,
    ) -> tuple[AliasChange | None, bool]:
        """The one place an alias changes: lock the model, compare, check the target, write history + event."""
        if not tx.lock_model(org, name):
            raise NotFoundError(f"registered model {name!r} does not exist")
        current = tx.get_alias(org, name, alias)
        if expected is not None and current != (expected or None):
            now_at = f"version {current}" if current is not None else "nothing (it is not set)"
            wanted = f"version {expected}" if expected else "nothing"
            raise AbortedError(
                f"alias {alias!r} of {name!r} points to {now_at}, not {wanted}: it moved meanwhile; "
                "read it again and retry"
            )
        if to_version is None:
            if current is None:
                raise NotFoundError(f"alias {alias!r} of {name!r} does not exist")
        else:
            target = tx.get_version(org, name, to_version)
            if target is None:
                raise NotFoundError(f"version {to_version} of {name!r} does not exist")
            if target.status is not VersionStatus.READY:
                why = f": {target.status_reason}" if target.status_reason else ""
                raise FailedPreconditionError(
                    f"version {to_version} of {name!r} is {target.status.value}{why}; "
                    "only READY versions can be aliased"
                )
            if current == to_version:
                return tx.latest_alias_change(org, name, alias), False
        change = tx.write_alias(
            org,
            name,
            alias,
            to_version=to_version,
            actor=actor,
            reason=reason,
            cause=cause,
            decision=decision,
            now=self.clock(),
        )
        tx.emit_alias_changed(change)
        # Whatever moved the alias makes the promotions still waiting for it moot.
        tx.supersede_pending_promotions(
            org,
            name,
            alias=alias,
            reason=f"alias moved by {actor} (history sequence {change.sequence})",
            now=self.clock(),
        )
        return change, True

    def alias_history(
        self, caller: Caller, name: str, alias: str, page_size: int, page_token: str
    ) -> tuple[list[AliasChange], str]:
        names.validate_model_name(name)
        if alias:
            names.validate_alias(alias)
        fingerprint = paging.fingerprint("alias-history", [name, alias])
        page = numeric_page(paging.page_request(page_size, page_token, fingerprint))
        with self.store.transaction() as tx:
            require_model(tx, caller.organization_id, name)
            items, after = tx.alias_history(caller.organization_id, name, alias, page)
        return items, paging.next_page_token(after, fingerprint)

    # ------------------------------------------------------------------------------------ promotion policies

    def set_policy(self, caller: Caller, policy: PromotionPolicy) -> PromotionPolicy:
        names.validate_model_name(policy.model_name)
        if not policy.target_alias:
            raise InvalidArgumentError("policy.target_alias is required: the alias to move, e.g. 'production'")
        names.validate_alias(policy.target_alias)
        if policy.baseline_alias:
            names.validate_alias(policy.baseline_alias)
        if not policy.metric_name:
            raise InvalidArgumentError("policy.metric_name is required: the metric compared, e.g. 'accuracy'")
        if len(policy.metric_name) > 128:
            raise InvalidArgumentError("policy.metric_name is longer than 128 characters")
        if not policy.min_improvement >= 0:
            raise InvalidArgumentError(
                f"policy.min_improvement must be zero or positive (got {policy.min_improvement}); it is the margin "
                "a candidate must win by"
            )
        validate_floors(policy)
        validate_online_gate(policy)
        with self.store.transaction() as tx:
            if not tx.lock_model(caller.organization_id, policy.model_name):
                raise NotFoundError(f"registered model {policy.model_name!r} does not exist")
            now = self.clock()
            stored = tx.put_policy(caller.organization_id, replace(policy, update_time=now))
            tx.supersede_pending_promotions(
                caller.organization_id, policy.model_name, alias=None, reason="the promotion policy changed", now=now
            )
            return stored

    def get_policy(self, caller: Caller, name: str) -> PromotionPolicy:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            require_model(tx, caller.organization_id, name)
            policy = tx.get_policy(caller.organization_id, name)
        if policy is None:
            raise NotFoundError(f"registered model {name!r} has no promotion policy")
        return policy

    def delete_policy(self, caller: Caller, name: str) -> None:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            if not tx.lock_model(caller.organization_id, name):
                raise NotFoundError(f"registered model {name!r} does not exist")
            if not tx.delete_policy(caller.organization_id, name):
                raise NotFoundError(f"registered model {name!r} has no promotion policy")
            tx.supersede_pending_promotions(
                caller.organization_id, name, alias=None, reason="the promotion policy was deleted", now=self.clock()
            )

    def evaluate_policy(
        self, tx: RegistryTransaction, org: str, name: str, version_number: int
    ) -> PromotionDecision | None:
        """Apply the model's policy to a version that finished verification (the policy consumer calls this).

        Returns the decision, or None when no enabled policy applies (no policy, version not READY, set
        after the policy... or already the target). A passing AUTOMATIC gate moves the alias (history cause
        POLICY, actor "policy", the decision recorded); MANUAL_APPROVAL records a pending promotion instead.
        """
        policy = tx.get_policy(org, name)
        if policy is None or not policy.enabled:
            return None
        if not tx.lock_model(org, name):
            return None
        candidate = tx.get_version(org, name, version_number)
        if candidate is None or candidate.status is not VersionStatus.READY:
            return None
        if policy.update_time is not None and candidate.update_time < policy.update_time:
            return None  # became READY before this policy existed
        current = tx.get_alias(org, name, policy.target_alias)
        if current == candidate.version:
            return None
        if candidate.rolled_back_reason:
            return PromotionDecision(
                metric_name=policy.metric_name,
                split=policy.split,
                candidate_version=candidate.version,
                candidate_value=candidate.metric(policy.metric_name, policy.split) or 0.0,
                baseline_version=None,
                baseline_value=None,
                min_improvement=policy.min_improvement,
                passed=False,
                explanation=(
                    f"version {candidate.version} was rolled back by the online gate ({candidate.rolled_back_reason}); "
                    "the policy never aliases it again: a person can (SetAlias)"
                ),
            )
        baseline_number = tx.get_alias(org, name, policy.effective_baseline_alias)
        baseline = tx.get_version(org, name, baseline_number) if baseline_number is not None else None
        decision = evaluate(policy, candidate, baseline)
        log.info(
            "promotion policy of %s for version %d: %s (%s)",
            name,
            candidate.version,
            "passed" if decision.passed else "not passed",
            decision.explanation,
        )
        if not decision.passed:
            return decision
        if policy.mode is PromotionMode.AUTOMATIC:
            self.move_alias(
                tx,
                org,
                name,
                policy.target_alias,
                candidate.version,
                expected=None,
                actor=POLICY_ACTOR,
                reason=decision.explanation,
                cause=AliasCause.POLICY,
                decision=decision,
            )
            if policy.online is not None and baseline_number is None:
                self._promote_without_baseline(tx, org, policy, decision)
            return decision
        now = self.clock()
        tx.supersede_pending_promotions(
            org, name, alias=policy.target_alias, reason=f"version {candidate.version} is a newer candidate", now=now
        )
        tx.add_pending_promotion(
            PendingPromotion(
                promotion_id=new_id(),
                organization_id=org,
                model_name=name,
                target_alias=policy.target_alias,
                version=candidate.version,
                from_version=current,
                decision=decision,
                state=PromotionState.PENDING,
                decided_by="",
                decision_reason="",
                create_time=now,
                decide_time=None,
            )
        )
        return decision

    def _promote_without_baseline(
        self, tx: RegistryTransaction, org: str, policy: PromotionPolicy, decision: PromotionDecision
    ) -> None:
        """The first canary has nothing to be compared with on traffic: it becomes the baseline at once."""
        self.move_alias(
            tx,
            org,
            policy.model_name,
            policy.baseline_alias,
            decision.candidate_version,
            expected=0,
            actor=ONLINE_GATE_ACTOR,
            reason=(
                f"alias {policy.baseline_alias!r} was not set: version {decision.candidate_version} has no version to "
                "be compared with on production feedback, so it is promoted at once"
            ),
            cause=AliasCause.ONLINE_GATE,
            decision=decision,
        )

    # ------------------------------------------------------------------------------------ the online gate

    def record_feedback(
        self, tx: RegistryTransaction, org: str, name: str, verdict: Verdict
    ) -> PromotionDecision | None:
        """Count one generation's feedback for the online gate, and decide when both versions have enough.

        Nothing is stored for a model without an enabled online gate. Returns the decision when this
        feedback completed one (the alias moved in ``tx``), else None.
        """
        policy = tx.get_policy(org, name)
        if policy is None or not policy.enabled or policy.online is None:
            return None
        if not tx.lock_model(org, name):
            return None
        window = self._window(tx, org, policy)
        tx.put_online_feedback(
            org,
            name,
            verdict.request_id,
            version=verdict.version,
            window=window,
            positive=verdict.positive,
            now=self.clock(),
        )
        return self._decide_online(tx, org, policy, window)

    def record_outcomes(
        self, tx: RegistryTransaction, org: str, name: str, *, version: int, succeeded: int, failed: int
    ) -> PromotionDecision | None:
        """Count replies of ``version`` for the online gate's error rates (nothing without an enabled gate)."""
        policy = tx.get_policy(org, name)
        if policy is None or not policy.enabled or policy.online is None:
            return None
        if not tx.lock_model(org, name):
            return None
        window = self._window(tx, org, policy)
        tx.add_online_outcomes(org, name, window=window, version=version, succeeded=succeeded, failed=failed)
        return self._decide_online(tx, org, policy, window)

    @staticmethod
    def _window(tx: RegistryTransaction, org: str, policy: PromotionPolicy) -> int:
        change = tx.latest_alias_change(org, policy.model_name, policy.target_alias)
        return change.sequence if change is not None else 0

    def _decide_online(
        self, tx: RegistryTransaction, org: str, policy: PromotionPolicy, window: int
    ) -> PromotionDecision | None:
        gate = policy.online
        assert gate is not None
        name = policy.model_name
        candidate = tx.get_alias(org, name, policy.target_alias)
        baseline = tx.get_alias(org, name, policy.baseline_alias)
        if candidate is None or baseline is None or candidate == baseline:
            return None
        counts = tx.online_feedback_counts(org, name, window)
        outcomes = tx.online_outcome_counts(org, name, window)
        decision = decide_online(
            gate,
            candidate_version=candidate,
            candidate=counts.get(candidate, FeedbackCount()),
            baseline_version=baseline,
            baseline=counts.get(baseline, FeedbackCount()),
            candidate_outcomes=outcomes.get(candidate, OutcomeCount()),
            baseline_outcomes=outcomes.get(baseline, OutcomeCount()),
        )
        if decision is None:
            return None
        log.info("online gate of %s, version %d: %s", name, candidate, decision.explanation)
        if decision.passed:
            alias, to_version = policy.baseline_alias, candidate
        else:
            alias, to_version = policy.target_alias, baseline
            tx.mark_rolled_back(org, name, candidate, decision.explanation)
        self.move_alias(
            tx,
            org,
            name,
            alias,
            to_version,
            expected=None,
            actor=ONLINE_GATE_ACTOR,
            reason=decision.explanation,
            cause=AliasCause.ONLINE_GATE,
            decision=decision,
        )
        return decision

    def list_pending(
        self, caller: Caller, name: str, include_decided: bool, page_size: int, page_token: str
    ) -> tuple[list[PendingPromotion], str]:
        if name:
            names.validate_model_name(name)
        fingerprint = paging.fingerprint("promotions", [name, include_decided])
        page = numeric_page(paging.page_request(page_size, page_token, fingerprint))
        with self.store.transaction() as tx:
            if name:
                require_model(tx, caller.organization_id, name)
            items, after = tx.list_pending_promotions(caller.organization_id, name, include_decided, page)
        return items, paging.next_page_token(after, fingerprint)

    def approve(self, caller: Caller, promotion_id: str, reason: str) -> PendingPromotion:
        validate_id(promotion_id, what="promotion_id")
        names.validate_text(reason, what="reason", limit=2000)
        org = caller.organization_id
        superseded: str | None = None
        with self.store.transaction() as tx:
            promotion = self._pending_for_decision(tx, org, promotion_id)
            current = tx.get_alias(org, promotion.model_name, promotion.target_alias)
            if current != promotion.from_version:
                tx.decide_pending_promotion(
                    org,
                    promotion_id,
                    state=PromotionState.SUPERSEDED,
                    decided_by=caller.actor,
                    reason="the alias moved after the promotion was proposed",
                    now=self.clock(),
                )
                superseded = (
                    f"alias {promotion.target_alias!r} moved to {current} since the promotion was proposed "
                    f"(from {promotion.from_version}); it is SUPERSEDED"
                )
            else:
                decided = tx.decide_pending_promotion(
                    org,
                    promotion_id,
                    state=PromotionState.APPROVED,
                    decided_by=caller.actor,
                    reason=reason,
                    now=self.clock(),
                )
                self.move_alias(
                    tx,
                    org,
                    promotion.model_name,
                    promotion.target_alias,
                    promotion.version,
                    expected=None,
                    actor=caller.actor,
                    reason=reason or promotion.decision.explanation,
                    cause=AliasCause.APPROVAL,
                    decision=promotion.decision,
                )
                return decided
        # Raised after the commit, so the SUPERSEDED state is kept.
        raise FailedPreconditionError(superseded)

    def reject(self, caller: Caller, promotion_id: str, reason: str) -> PendingPromotion:
        validate_id(promotion_id, what="promotion_id")
        names.validate_text(reason, what="reason", limit=2000)
        with self.store.transaction() as tx:
            self._pending_for_decision(tx, caller.organization_id, promotion_id)
            return tx.decide_pending_promotion(
                caller.organization_id,
                promotion_id,
                state=PromotionState.REJECTED,
                decided_by=caller.actor,
                reason=reason,
                now=self.clock(),
            )

    @staticmethod
    def _pending_for_decision(tx: RegistryTransaction, org: str, promotion_id: str) -> PendingPromotion:
        promotion = tx.get_pending_promotion(org, promotion_id)
        if promotion is None:
            raise NotFoundError(f"promotion {promotion_id!r} does not exist")
        tx.lock_model(org, promotion.model_name)
        promotion = tx.get_pending_promotion(org, promotion_id)  # re-read under the lock
        assert promotion is not None
        if promotion.state is not PromotionState.PENDING:
            raise FailedPreconditionError(
                f"promotion {promotion_id!r} is {promotion.state.value}, no longer PENDING"
                + (f" (decided by {promotion.decided_by})" if promotion.decided_by else "")
            )
        return promotion


def validate_expected(expected: int | None) -> None:
    if expected is not None and expected < 0:
        raise InvalidArgumentError(
            f"expected_current_version must be 0 (alias not set) or a version number, got {expected}"
        )


def validate_floors(policy: PromotionPolicy) -> None:
    if len(policy.min_metrics) > MAX_FLOORS:
        raise InvalidArgumentError(f"policy.min_metrics has {len(policy.min_metrics)} floors; at most {MAX_FLOORS}")
    seen: set[tuple[str, str]] = set()
    for floor in policy.min_metrics:
        if not floor.name or len(floor.name) > 128:
            raise InvalidArgumentError("policy.min_metrics: every floor needs a metric name of 1-128 characters")
        if not math.isfinite(floor.value):
            raise InvalidArgumentError(f"policy.min_metrics: the floor of {floor.name!r} must be a finite number")
        if (floor.name, floor.split) in seen:
            raise InvalidArgumentError(f"policy.min_metrics names {floor.name}/{floor.split} twice")
        seen.add((floor.name, floor.split))


def validate_online_gate(policy: PromotionPolicy) -> None:
    gate = policy.online
    if gate is None:
        return
    if not policy.baseline_alias or policy.baseline_alias == policy.target_alias:
        raise InvalidArgumentError(
            "policy.online_gate needs baseline_alias set and different from target_alias: target_alias is the "
            "canary's alias (e.g. 'candidate'), baseline_alias the one it is promoted to (e.g. 'production')"
        )
    if not 1 <= gate.min_feedback <= MAX_MIN_FEEDBACK:
        raise InvalidArgumentError(
            f"policy.online_gate.min_feedback must be 1 to {MAX_MIN_FEEDBACK} (got {gate.min_feedback}): the "
            "feedback each version needs before the gate decides"
        )
    if not 0 < gate.alpha <= 0.5:
        raise InvalidArgumentError(f"policy.online_gate.alpha must be in (0, 0.5] (got {gate.alpha})")
    if not 0 <= gate.max_error_rate_increase < 1:
        raise InvalidArgumentError(
            f"policy.online_gate.max_error_rate_increase must be in [0, 1) (got {gate.max_error_rate_increase}): the "
            "rise of the error rate tolerated"
        )
    if not 0 <= gate.max_rate_drop < 1:
        raise InvalidArgumentError(
            f"policy.online_gate.max_rate_drop must be in [0, 1) (got {gate.max_rate_drop}): the drop of the "
            "positive-feedback rate tolerated"
        )
