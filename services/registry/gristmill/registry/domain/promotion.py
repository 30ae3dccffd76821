"""Aliases and their promotion: manual moves with compare-and-set, policies, and approvals.

Every alias change goes through ``move_alias``: under the model's lock it compares, checks the target,
appends the history entry, writes the ``alias changed`` event and supersedes the promotions waiting for
that alias, all in the caller's transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
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
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
    VersionStatus,
)
from gristmill.registry.domain.policy import evaluate
from gristmill.registry.domain.ports import RegistryStore, RegistryTransaction

log = logging.getLogger(__name__)

POLICY_ACTOR = "policy"


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
