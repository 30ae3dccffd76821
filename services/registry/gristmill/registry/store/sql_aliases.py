"""SQL part of the registry store: aliases and their history (one sequence per model, bumped in SQL)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gristmill.core.errors import AbortedError
from gristmill.core.paging import Page
from gristmill.core.sql import utc
from gristmill.registry.domain.model import AliasCause, AliasChange, PromotionDecision
from gristmill.registry.domain.ports import AliasRepository
from gristmill.registry.store.sql_common import SqlUnit, optional, plain_or_none
from gristmill.registry.store.tables import AliasHistoryRow, AliasRow, ModelRow


class SqlAliases(SqlUnit, AliasRepository):
    # -- aliases --------------------------------------------------------------------------------------------

    def get_alias(self, org: str, model_name: str, alias: str) -> int | None:
        found = self.session.execute(
            select(AliasRow.version)
            .join(ModelRow, ModelRow.id == AliasRow.model_id)
            .where(ModelRow.organization_id == org, ModelRow.name == model_name, AliasRow.name == alias)
        ).scalar_one_or_none()
        return None if found is None else int(found)

    def write_alias(
        self,
        org: str,
        model_name: str,
        alias: str,
        *,
        to_version: int | None,
        actor: str,
        reason: str,
        cause: AliasCause,
        decision: PromotionDecision | None,
        now: datetime,
    ) -> AliasChange:
        model = self._require_model_row(org, model_name)
        current = self.session.execute(
            select(AliasRow).where(AliasRow.model_id == model.id, AliasRow.name == alias)
        ).scalar_one_or_none()
        from_version = None if current is None else current.version
        if to_version is None:
            if current is not None:
                self.session.delete(current)
        elif current is None:
            self.session.add(AliasRow(model_id=model.id, name=alias, version=to_version, update_time=now))
        else:
            current.version = to_version
            current.update_time = now
        self.session.execute(
            update(ModelRow)
            .where(ModelRow.id == model.id)
            .values(alias_sequence=ModelRow.alias_sequence + 1)
            .execution_options(synchronize_session=False)
        )
        sequence = int(
            self.session.execute(select(ModelRow.alias_sequence).where(ModelRow.id == model.id)).scalar_one()
        )
        history = AliasHistoryRow(
            model_id=model.id,
            sequence=sequence,
            alias=alias,
            from_version=from_version,
            to_version=to_version,
            actor=actor,
            reason=reason,
            cause=cause.value,
            decision=plain_or_none(decision),
            change_time=now,
        )
        self.session.add(history)
        try:
            self.session.flush()
        except IntegrityError:
            # Only reachable when a caller skipped lock_model and raced another writer.
            raise AbortedError(f"alias {alias!r} of {model_name!r} changed concurrently; retry") from None
        return self._change(model, history)

    @staticmethod
    def _change(model: ModelRow, row: AliasHistoryRow) -> AliasChange:
        return AliasChange(
            organization_id=model.organization_id,
            model_name=model.name,
            alias=row.alias,
            sequence=row.sequence,
            from_version=row.from_version,
            to_version=row.to_version,
            actor=row.actor,
            reason=row.reason,
            cause=AliasCause(row.cause),
            decision=optional(PromotionDecision, row.decision),
            change_time=utc(row.change_time),
        )

    def latest_alias_change(self, org: str, model_name: str, alias: str) -> AliasChange | None:
        model = self._require_model_row(org, model_name)
        row = self.session.execute(
            select(AliasHistoryRow)
            .where(AliasHistoryRow.model_id == model.id, AliasHistoryRow.alias == alias)
            .order_by(AliasHistoryRow.sequence.desc())
            .limit(1)
        ).scalar_one_or_none()
        return None if row is None else self._change(model, row)

    def alias_history(self, org: str, model_name: str, alias: str, page: Page) -> tuple[list[AliasChange], str | None]:
        model = self._require_model_row(org, model_name)
        stmt = select(AliasHistoryRow).where(AliasHistoryRow.model_id == model.id)
        if alias:
            stmt = stmt.where(AliasHistoryRow.alias == alias)
        if page.after is not None:
            stmt = stmt.where(AliasHistoryRow.sequence < int(page.after))
        rows = list(self.session.execute(stmt.order_by(AliasHistoryRow.sequence.desc()).limit(page.size + 1)).scalars())
        more = len(rows) > page.size
        rows = rows[: page.size]
        return [self._change(model, r) for r in rows], (str(rows[-1].sequence) if more and rows else None)
