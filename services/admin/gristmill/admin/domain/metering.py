"""Usage metering: hourly totals built from ``usage recorded`` events, and the queries over them.

An organisation's own keys read its usage with any scope; other organisations' usage needs a root
organisation admin key (others get NOT_FOUND, as for any object of another organisation).

Usage is kept per UTC hour, so a query's range starts at the beginning of the hour of ``start``; a
period's total counts every event whose time falls in it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gristmill.admin.domain.admin import Admin, key_not_found
from gristmill.admin.domain.model import Granularity, Organization, QuotaStatus, UsageQuery, UsageTotal
from gristmill.admin.domain.ports import AdminStore
from gristmill.core.auth import Principal, organization_or_default
from gristmill.core.auth_quota import QuotaPeriod, UsageKind, period_bounds
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.core.values import utc_now

Clock = Callable[[], datetime]
MAX_PERIODS = 10_000
_PERIOD_OF = {
    Granularity.HOUR: QuotaPeriod.HOUR,
    Granularity.DAY: QuotaPeriod.DAY,
    Granularity.MONTH: QuotaPeriod.MONTH,
}


class InvalidUsageError(InvalidArgumentError):
    """A usage event that cannot be counted (it goes to the dead-letter topic)."""


def hour_of(at: datetime) -> datetime:
    return period_bounds(QuotaPeriod.HOUR, at)[0]


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One ``usage recorded`` event, as the aggregator counts it (``kind`` as sent: checked when recorded)."""

    organization_id: str
    api_key_id: str
    kind: int
    quantity: float
    at: datetime


def _bucket_of(event: UsageEvent) -> tuple[str, str, UsageKind, datetime]:
    """The hourly total ``event`` adds to: (organisation, api key, kind, hour); ``InvalidUsageError`` if it
    cannot be counted."""
    try:
        kind = UsageKind(event.kind)
    except ValueError:
        raise InvalidUsageError(f"usage event has unknown kind {event.kind}") from None
    if not (math.isfinite(event.quantity) and event.quantity > 0):
        raise InvalidUsageError(f"usage event quantity must be a positive number (got {event.quantity})")
    org = organization_or_default(event.organization_id)
    key_id = validate_id(event.api_key_id, what="usage event api_key_id") if event.api_key_id else ""
    return org, key_id, kind, hour_of(event.at)


def _sort_key(bucket: tuple[str, str, UsageKind, datetime]) -> tuple[str, str, int, datetime]:
    org, key_id, kind, hour = bucket
    return org, key_id, kind.value, hour


class Metering:
    def __init__(self, store: AdminStore, admin: Admin, *, clock: Clock = utc_now) -> None:
        self.store = store
        self.admin = admin
        self.clock = clock

    # -- the aggregator ------------------------------------------------------------------------------------

    def record(
        self,
        session: Any,
        *,
        organization_id: str,
        api_key_id: str,
        kind: int,
        quantity: float,
        at: datetime,
    ) -> None:
        """Add one event's usage to its hour, through the consumer's transaction ``session``."""
        self.record_many(session, [UsageEvent(organization_id, api_key_id, kind, quantity, at)])

    def record_many(self, session: Any, events: Iterable[UsageEvent]) -> None:
        """Add a batch of events' usage through ``session``: one store write per (organisation, key, kind, hour),
        however many events fall in it. Every event is checked first, so an invalid one (``InvalidUsageError``)
        writes nothing."""
        totals: dict[tuple[str, str, UsageKind, datetime], float] = defaultdict(float)
        for event in events:
            totals[_bucket_of(event)] += event.quantity
        # In one order, so that two transactions adding to the same totals cannot deadlock on each other's rows.
        for (org, key_id, kind, hour), quantity in sorted(totals.items(), key=lambda item: _sort_key(item[0])):
            self.store.add_usage(session, org, key_id, kind, hour, quantity)

    # -- queries -------------------------------------------------------------------------------------------

    def usage(self, caller: Principal, query: UsageQuery) -> list[UsageTotal]:
        org = self.admin.existing_organization(caller, query.organization_id).organization_id
        if query.api_key_id:
            key_id = validate_id(query.api_key_id, what="api_key_id")
            stored = self.store.get_key(key_id)
            if stored is None or stored.key.organization_id != org:
                raise key_not_found(key_id)
        now = self.clock()
        start = query.start or period_bounds(QuotaPeriod.MONTH, now)[0]
        end = query.end or now
        if end < start:
            raise InvalidArgumentError("end_time is before start_time")
        periods = self._periods(query.granularity, start, end)
        buckets = self.store.usage(org, api_key_id=query.api_key_id, kinds=query.kinds, start=hour_of(start), end=end)
        totals: dict[tuple[datetime, UsageKind, str], float] = defaultdict(float)
        for bucket in buckets:
            period_start = self._period_start(query.granularity, bucket.hour_start, start)
            key_id = bucket.api_key_id if query.group_by_api_key else ""
            totals[(period_start, bucket.kind, key_id)] += bucket.quantity
        if query.granularity is Granularity.NONE and not query.group_by_api_key:
            # One total per asked kind over the range, zero included, so "nothing used" is an answer.
            for kind in query.kinds or tuple(UsageKind):
                totals.setdefault((start, kind, ""), 0.0)
        ends = dict(periods)
        return [
            UsageTotal(kind, key_id, period_start, ends[period_start], quantity)
            for (period_start, kind, key_id), quantity in sorted(
                totals.items(), key=lambda item: (item[0][0], item[0][1].value, item[0][2])
            )
        ]

    def _periods(self, granularity: Granularity, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The periods of the range, clipped to it; INVALID_ARGUMENT beyond ``MAX_PERIODS``."""
        if granularity is Granularity.NONE:
            return [(start, end)]
        period = _PERIOD_OF[granularity]
        periods: list[tuple[datetime, datetime]] = []
        cursor = start
        while cursor < end:
            if len(periods) >= MAX_PERIODS:
                raise InvalidArgumentError(
                    f"the range has more than {MAX_PERIODS} {granularity.value} periods: narrow it or choose a "
                    "coarser granularity"
                )
            period_end = min(period_bounds(period, cursor)[1], end)
            periods.append((cursor, period_end))
            cursor = period_end
        return periods or [(start, end)]

    @staticmethod
    def _period_start(granularity: Granularity, hour_start: datetime, start: datetime) -> datetime:
        if granularity is Granularity.NONE:
            return start
        return max(period_bounds(_PERIOD_OF[granularity], hour_start)[0], start)

    def quota_status(self, caller: Principal, organization_id: str) -> tuple[Organization, list[QuotaStatus]]:
        org = self.admin.existing_organization(caller, organization_id)
        now = self.clock()
        statuses = []
        for quota in org.plan.quotas:
            start, end = period_bounds(quota.period, now)
            buckets = self.store.usage(org.organization_id, api_key_id="", kinds=[quota.kind], start=start, end=end)
            used = sum(b.quantity for b in buckets)
            statuses.append(QuotaStatus(quota, used, max(0.0, quota.limit - used), end))
        return org, statuses
