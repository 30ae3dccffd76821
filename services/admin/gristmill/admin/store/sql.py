"""SQLAlchemy implementation of the admin store (SQLite file by default, PostgreSQL by URL).

Keys are stored with their salted hash only. Usage is kept as one row per (organisation, key, kind, UTC
hour): the aggregator adds to it, queries sum it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.admin.domain.model import ApiKey, Organization, StoredKey, UsageBucket
from gristmill.admin.domain.ports import AdminStore
from gristmill.admin.store.tables import ADMIN_TABLES, ApiKeyRow, OrganizationRow, UsageRow
from gristmill.core.auth_quota import Plan, Quota, QuotaPeriod, RateLimit, UsageKind
from gristmill.core.errors import AlreadyExistsError
from gristmill.core.paging import Page
from gristmill.core.sql import Database, utc

# ADMIN_TABLES: what the migrations (``store/migrations``) import from here.
__all__ = ["ADMIN_TABLES", "SqlAdminStore"]


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def _plan_to_json(plan: Plan) -> dict[str, Any]:
    rate = plan.prediction_rate_limit
    return {
        "name": plan.name,
        "quotas": [{"kind": q.kind.name, "period": q.period.name, "limit": q.limit} for q in plan.quotas],
        "rate": None if rate is None else {"rps": rate.requests_per_second, "burst": rate.burst},
    }


def _plan_from_json(data: dict[str, Any]) -> Plan:
    rate = data.get("rate")
    return Plan(
        name=str(data.get("name", "")),
        quotas=tuple(
            Quota(UsageKind[q["kind"]], QuotaPeriod[q["period"]], float(q["limit"])) for q in data.get("quotas", [])
        ),
        prediction_rate_limit=None if rate is None else RateLimit(float(rate["rps"]), int(rate["burst"])),
    )


def _organization(row: OrganizationRow) -> Organization:
    return Organization(row.organization_id, row.display_name, _plan_from_json(row.plan), utc(row.create_time))


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        api_key_id=row.api_key_id,
        organization_id=row.organization_id,
        display_name=row.display_name,
        scopes=frozenset(row.scopes),
        secret_prefix=row.secret_prefix,
        create_time=utc(row.create_time),
        expire_time=_utc_or_none(row.expire_time),
        revoke_time=_utc_or_none(row.revoke_time),
        last_used_time=_utc_or_none(row.last_used_time),
        rotated_from_api_key_id=row.rotated_from,
    )


def _key_row(key: ApiKey, secret_hash: str) -> ApiKeyRow:
    return ApiKeyRow(
        api_key_id=key.api_key_id,
        organization_id=key.organization_id,
        display_name=key.display_name,
        scopes=sorted(key.scopes),
        secret_hash=secret_hash,
        secret_prefix=key.secret_prefix,
        create_time=utc(key.create_time),
        expire_time=_utc_or_none(key.expire_time),
        revoke_time=_utc_or_none(key.revoke_time),
        last_used_time=_utc_or_none(key.last_used_time),
        rotated_from=key.rotated_from_api_key_id,
    )


class SqlAdminStore(AdminStore):
    def __init__(self, database: Database) -> None:
        self.database = database

    # -- organisations -----------------------------------------------------------------------------------

    def insert_organization(self, organization: Organization) -> Organization:
        try:
            with self.database.transaction() as session:
                session.add(
                    OrganizationRow(
                        organization_id=organization.organization_id,
                        display_name=organization.display_name,
                        plan=_plan_to_json(organization.plan),
                        create_time=utc(organization.create_time),
                    )
                )
        except IntegrityError:
            raise AlreadyExistsError(f"organization {organization.organization_id!r} already exists") from None
        return organization

    def get_organization(self, organization_id: str) -> Organization | None:
        with self.database.transaction() as session:
            row = session.get(OrganizationRow, organization_id)
            return None if row is None else _organization(row)

    def list_organizations(self, page: Page) -> tuple[list[Organization], str | None]:
        with self.database.transaction() as session:
            query = select(OrganizationRow).order_by(OrganizationRow.organization_id)
            if page.after is not None:
                query = query.where(OrganizationRow.organization_id > page.after)
            rows = list(session.execute(query.limit(page.size + 1)).scalars())
            items = [_organization(r) for r in rows[: page.size]]
        return items, (items[-1].organization_id if len(rows) > page.size else None)

    def set_plan(self, organization_id: str, plan: Plan) -> Organization | None:
        with self.database.transaction() as session:
            row = session.get(OrganizationRow, organization_id)
            if row is None:
                return None
            row.plan = _plan_to_json(plan)
            return _organization(row)

    # -- API keys ------------------------------------------------------------------------------------------

    def insert_key(self, key: ApiKey, secret_hash: str) -> ApiKey:
        try:
            with self.database.transaction() as session:
                session.add(_key_row(key, secret_hash))
        except IntegrityError:
            # 64 random bits collided: astronomically rare, and the caller may simply retry.
            raise AlreadyExistsError(f"API key id {key.api_key_id} is taken; retry") from None
        return key

    def get_key(self, api_key_id: str) -> StoredKey | None:
        with self.database.transaction() as session:
            row = session.execute(select(ApiKeyRow).where(ApiKeyRow.api_key_id == api_key_id)).scalar_one_or_none()
            return None if row is None else StoredKey(_key(row), row.secret_hash)

    def count_keys(self, organization_id: str) -> int:
        with self.database.transaction() as session:
            query = select(func.count()).select_from(ApiKeyRow).where(ApiKeyRow.organization_id == organization_id)
            return int(session.execute(query).scalar_one())

    def list_keys(
        self, organization_id: str, *, include_revoked_before: datetime | None, page: Page
    ) -> tuple[list[ApiKey], str | None]:
        with self.database.transaction() as session:
            query = select(ApiKeyRow).where(ApiKeyRow.organization_id == organization_id)
            if include_revoked_before is not None:
                query = query.where(
                    (ApiKeyRow.revoke_time.is_(None)) | (ApiKeyRow.revoke_time > utc(include_revoked_before))
                )
            if page.after is not None:
                query = query.where(ApiKeyRow.ordinal < int(page.after))
            rows = list(session.execute(query.order_by(ApiKeyRow.ordinal.desc()).limit(page.size + 1)).scalars())
            items = [_key(r) for r in rows[: page.size]]
            last = rows[page.size - 1].ordinal if len(rows) > page.size else None
        return items, (None if last is None else str(last))

    def rotate_key(self, old_api_key_id: str, old_revoke_time: datetime, new: ApiKey, secret_hash: str) -> ApiKey:
        revoke_time = utc(old_revoke_time)
        try:
            with self.database.transaction() as session:
                session.execute(
                    update(ApiKeyRow)
                    .where(ApiKeyRow.api_key_id == old_api_key_id)
                    .where(ApiKeyRow.revoke_time.is_(None) | (ApiKeyRow.revoke_time > revoke_time))
                    .values(revoke_time=revoke_time)
                )
                session.add(_key_row(new, secret_hash))
        except IntegrityError:
            # As for insert_key; the old key's revocation rolled back with it.
            raise AlreadyExistsError(f"API key id {new.api_key_id} is taken; retry") from None
        return new

    def revoke_key(self, api_key_id: str, at: datetime) -> ApiKey | None:
        with self.database.transaction() as session:
            row = session.execute(select(ApiKeyRow).where(ApiKeyRow.api_key_id == api_key_id)).scalar_one_or_none()
            if row is None:
                return None
            if row.revoke_time is None or utc(row.revoke_time) > at:
                row.revoke_time = utc(at)
            return _key(row)

    def touch_key(self, api_key_id: str, at: datetime) -> None:
        with self.database.transaction() as session:
            session.execute(update(ApiKeyRow).where(ApiKeyRow.api_key_id == api_key_id).values(last_used_time=utc(at)))

    # -- usage ---------------------------------------------------------------------------------------------

    def add_usage(
        self,
        session: Session,
        organization_id: str,
        api_key_id: str,
        kind: UsageKind,
        hour_start: datetime,
        quantity: float,
    ) -> None:
        # One atomic upsert (both back-ends have INSERT ... ON CONFLICT DO UPDATE): reading the total and
        # writing it back would lose one of two concurrent additions, and two first additions to an hour
        # would collide on its key.
        table = cast(Table, UsageRow.__table__)
        values = {
            "organization_id": organization_id,
            "api_key_id": api_key_id,
            "kind": kind.name,
            "hour_start": utc(hour_start),
            "quantity": quantity,
        }
        keys = ["organization_id", "api_key_id", "kind", "hour_start"]
        if session.get_bind().dialect.name == "postgresql":
            pg = postgresql_insert(table).values(values)
            session.execute(
                pg.on_conflict_do_update(
                    index_elements=keys, set_={"quantity": table.c.quantity + pg.excluded.quantity}
                )
            )
        else:
            lite = sqlite_insert(table).values(values)
            session.execute(
                lite.on_conflict_do_update(
                    index_elements=keys, set_={"quantity": table.c.quantity + lite.excluded.quantity}
                )
            )

    def usage(
        self,
        organization_id: str,
        *,
        api_key_id: str,
        kinds: Sequence[UsageKind],
        start: datetime,
        end: datetime,
    ) -> list[UsageBucket]:
        with self.database.transaction() as session:
            query = select(UsageRow).where(
                UsageRow.organization_id == organization_id,
                UsageRow.hour_start >= utc(start),
                UsageRow.hour_start < utc(end),
            )
            if api_key_id:
                query = query.where(UsageRow.api_key_id == api_key_id)
            if kinds:
                query = query.where(UsageRow.kind.in_([k.name for k in kinds]))
            rows = session.execute(query.order_by(UsageRow.hour_start, UsageRow.kind, UsageRow.api_key_id)).scalars()
            return [UsageBucket(r.api_key_id, UsageKind[r.kind], utc(r.hour_start), r.quantity) for r in rows]
