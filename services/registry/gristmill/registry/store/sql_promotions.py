"""SQL part of the registry store: promotion policies and pending promotions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, update

from gristmill.core.errors import NotFoundError
from gristmill.core.paging import Page
from gristmill.core.sql import utc
from gristmill.registry.domain.model import (
    FeedbackCount,
    MetricGoal,
    OnlineGate,
    OutcomeCount,
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
)
from gristmill.registry.domain.ports import PromotionRepository
from gristmill.registry.store.sql_common import (
    SqlUnit,
    metrics_from_plain,
    metrics_to_plain,
    optional,
    plain_or_none,
)
from gristmill.registry.store.tables import (
    ModelRow,
    OnlineFeedbackRow,
    OnlineOutcomeRow,
    PendingPromotionRow,
    PolicyRow,
    VersionRow,
)


class SqlPromotions(SqlUnit, PromotionRepository):
    # -- promotion policies ----------------------------------------------------------------------------------

    def put_policy(self, org: str, policy: PromotionPolicy) -> PromotionPolicy:
        model = self._require_model_row(org, policy.model_name)
        row = self.session.get(PolicyRow, model.id)
        if row is None:
            row = PolicyRow(model_id=model.id)
            self.session.add(row)
        row.enabled = policy.enabled
        row.target_alias = policy.target_alias
        row.metric_name = policy.metric_name
        row.split = policy.split
        row.goal = policy.goal.value
        row.baseline_alias = policy.baseline_alias
        row.min_improvement = policy.min_improvement
        row.min_value = policy.min_value
        row.mode = policy.mode.value
        row.online_gate = plain_or_none(policy.online_gate)
        row.min_metrics = metrics_to_plain(policy.min_metrics) if policy.min_metrics else None
        assert policy.update_time is not None
        row.update_time = policy.update_time
        self.session.flush()
        return self._policy(model, row)

    @staticmethod
    def _policy(model: ModelRow, row: PolicyRow) -> PromotionPolicy:
        return PromotionPolicy(
            model_name=model.name,
            enabled=row.enabled,
            target_alias=row.target_alias,
            metric_name=row.metric_name,
            split=row.split,
            goal=MetricGoal(row.goal),
            baseline_alias=row.baseline_alias,
            min_improvement=row.min_improvement,
            min_value=row.min_value,
            mode=PromotionMode(row.mode),
            update_time=utc(row.update_time),
            online_gate=optional(OnlineGate, row.online_gate),
            min_metrics=metrics_from_plain(row.min_metrics) if row.min_metrics else (),
        )

    def get_policy(self, org: str, model_name: str) -> PromotionPolicy | None:
        model = self._model_row(org, model_name)
        if model is None:
            return None
        row = self.session.get(PolicyRow, model.id)
        return None if row is None else self._policy(model, row)

    def delete_policy(self, org: str, model_name: str) -> bool:
        model = self._require_model_row(org, model_name)
        result = self.session.execute(delete(PolicyRow).where(PolicyRow.model_id == model.id))
        return bool(getattr(result, "rowcount", 0))

    # -- the online gate ------------------------------------------------------------------------------------

    def put_online_feedback(
        self, org: str, model_name: str, request_id: str, *, version: int, window: int, positive: bool, now: datetime
    ) -> None:
        model = self._require_model_row(org, model_name)
        # Under the model's lock (the caller holds it), so read-then-write is safe on both back-ends.
        row = self.session.get(OnlineFeedbackRow, (model.id, request_id))
        if row is None:
            row = OnlineFeedbackRow(model_id=model.id, request_id=request_id)
            self.session.add(row)
        row.window = window
        row.version = version
        row.positive = positive
        row.update_time = now
        self.session.flush()

    def online_feedback_counts(self, org: str, model_name: str, window: int) -> dict[int, FeedbackCount]:
        model = self._require_model_row(org, model_name)
        rows = self.session.execute(
            select(OnlineFeedbackRow.version, OnlineFeedbackRow.positive, func.count())
            .where(OnlineFeedbackRow.model_id == model.id, OnlineFeedbackRow.window == window)
            .group_by(OnlineFeedbackRow.version, OnlineFeedbackRow.positive)
        ).all()
        counts: dict[int, FeedbackCount] = {}
        for version, positive, count in rows:
            now = counts.get(version, FeedbackCount())
            counts[version] = (
                FeedbackCount(now.positive + count, now.negative)
                if positive
                else FeedbackCount(now.positive, now.negative + count)
            )
        return counts

    def add_online_outcomes(
        self, org: str, model_name: str, *, window: int, version: int, succeeded: int, failed: int
    ) -> None:
        model = self._require_model_row(org, model_name)
        row = self.session.get(OnlineOutcomeRow, (model.id, window, version))
        if row is None:
            row = OnlineOutcomeRow(model_id=model.id, window=window, version=version, succeeded=0, failed=0)
            self.session.add(row)
        row.succeeded += succeeded
        row.failed += failed
        self.session.flush()

    def online_outcome_counts(self, org: str, model_name: str, window: int) -> dict[int, OutcomeCount]:
        model = self._require_model_row(org, model_name)
        rows = self.session.execute(
            select(OnlineOutcomeRow).where(OnlineOutcomeRow.model_id == model.id, OnlineOutcomeRow.window == window)
        ).scalars()
        return {row.version: OutcomeCount(row.succeeded, row.failed) for row in rows}

    def mark_rolled_back(self, org: str, model_name: str, version: int, reason: str) -> None:
        model = self._require_model_row(org, model_name)
        self.session.execute(
            update(VersionRow)
            .where(VersionRow.model_id == model.id, VersionRow.version == version)
            .values(rolled_back_reason=reason)
        )

    # -- pending promotions ---------------------------------------------------------------------------------

    def _promotion(self, row: PendingPromotionRow, model_name: str) -> PendingPromotion:
        decision = optional(PromotionDecision, row.decision)
        assert decision is not None
        return PendingPromotion(
            promotion_id=row.promotion_id,
            organization_id=row.organization_id,
            model_name=model_name,
            target_alias=row.target_alias,
            version=row.version,
            from_version=row.from_version,
            decision=decision,
            state=PromotionState(row.state),
            decided_by=row.decided_by,
            decision_reason=row.decision_reason,
            create_time=utc(row.create_time),
            decide_time=None if row.decide_time is None else utc(row.decide_time),
        )

    def add_pending_promotion(self, promotion: PendingPromotion) -> PendingPromotion:
        model = self._require_model_row(promotion.organization_id, promotion.model_name)
        row = PendingPromotionRow(
            promotion_id=promotion.promotion_id,
            organization_id=promotion.organization_id,
            model_id=model.id,
            target_alias=promotion.target_alias,
            version=promotion.version,
            from_version=promotion.from_version,
            decision=plain_or_none(promotion.decision),
            state=promotion.state.value,
            decided_by=promotion.decided_by,
            decision_reason=promotion.decision_reason,
            create_time=promotion.create_time,
            decide_time=promotion.decide_time,
        )
        self.session.add(row)
        self.session.flush()
        return self._promotion(row, model.name)

    def get_pending_promotion(self, org: str, promotion_id: str) -> PendingPromotion | None:
        found = self.session.execute(
            select(PendingPromotionRow, ModelRow.name)
            .join(ModelRow, ModelRow.id == PendingPromotionRow.model_id)
            .where(PendingPromotionRow.organization_id == org, PendingPromotionRow.promotion_id == promotion_id)
        ).first()
        return None if found is None else self._promotion(found[0], found[1])

    def list_pending_promotions(
        self, org: str, model_name: str, include_decided: bool, page: Page
    ) -> tuple[list[PendingPromotion], str | None]:
        stmt = (
            select(PendingPromotionRow, ModelRow.name)
            .join(ModelRow, ModelRow.id == PendingPromotionRow.model_id)
            .where(PendingPromotionRow.organization_id == org)
        )
        if model_name:
            stmt = stmt.where(ModelRow.name == model_name)
        if not include_decided:
            stmt = stmt.where(PendingPromotionRow.state == PromotionState.PENDING.value)
        if page.after is not None:
            stmt = stmt.where(PendingPromotionRow.ordinal > int(page.after))
        rows = self.session.execute(stmt.order_by(PendingPromotionRow.ordinal).limit(page.size + 1)).all()
        more = len(rows) > page.size
        rows = rows[: page.size]
        items = [self._promotion(row, name) for row, name in rows]
        return items, (str(rows[-1][0].ordinal) if more and rows else None)

    def decide_pending_promotion(
        self, org: str, promotion_id: str, *, state: PromotionState, decided_by: str, reason: str, now: datetime
    ) -> PendingPromotion:
        found = self.session.execute(
            select(PendingPromotionRow, ModelRow.name)
            .join(ModelRow, ModelRow.id == PendingPromotionRow.model_id)
            .where(PendingPromotionRow.organization_id == org, PendingPromotionRow.promotion_id == promotion_id)
        ).first()
        if found is None:
            raise NotFoundError(f"promotion {promotion_id!r} does not exist")
        row, name = found
        row.state = state.value
        row.decided_by = decided_by
        row.decision_reason = reason
        row.decide_time = now
        self.session.flush()
        return self._promotion(row, name)

    def supersede_pending_promotions(
        self, org: str, model_name: str, *, alias: str | None, reason: str, now: datetime
    ) -> int:
        model = self._require_model_row(org, model_name)
        stmt = update(PendingPromotionRow).where(
            PendingPromotionRow.model_id == model.id, PendingPromotionRow.state == PromotionState.PENDING.value
        )
        if alias is not None:
            stmt = stmt.where(PendingPromotionRow.target_alias == alias)
        result = self.session.execute(
            stmt.values(
                state=PromotionState.SUPERSEDED.value, decided_by="registry", decision_reason=reason, decide_time=now
            ).execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0))
