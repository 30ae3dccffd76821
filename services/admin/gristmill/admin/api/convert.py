"""Proto ↔ domain conversions for the admin API (plans: ``gristmill.core.auth_quota``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.admin.domain.model import ApiKey, Granularity, Organization, QuotaStatus, UsageQuery, UsageTotal
from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.core.auth_quota import UsageKind, plan_to_proto
from gristmill.core.auth_remote import to_timestamp
from gristmill.core.errors import InvalidArgumentError

_GRANULARITY = {
    pb.USAGE_GRANULARITY_UNSPECIFIED: Granularity.NONE,
    pb.USAGE_GRANULARITY_HOUR: Granularity.HOUR,
    pb.USAGE_GRANULARITY_DAY: Granularity.DAY,
    pb.USAGE_GRANULARITY_MONTH: Granularity.MONTH,
}


def time_from_proto(stamp: Timestamp, field: str) -> datetime:
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgumentError(f"{field} is not a valid time") from None


def duration_from_proto(duration: Duration, field: str) -> timedelta:
    try:
        return duration.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgumentError(f"{field} is not a valid duration") from None


def organization_to_proto(org: Organization) -> pb.Organization:
    return pb.Organization(
        organization_id=org.organization_id,
        display_name=org.display_name,
        plan=plan_to_proto(org.plan),
        create_time=to_timestamp(org.create_time),
    )


def key_to_proto(key: ApiKey) -> pb.ApiKey:
    message = pb.ApiKey(
        api_key_id=key.api_key_id,
        organization_id=key.organization_id,
        display_name=key.display_name,
        scopes=sorted(key.scopes),
        secret_prefix=key.secret_prefix,
        create_time=to_timestamp(key.create_time),
        rotated_from_api_key_id=key.rotated_from_api_key_id,
    )
    if key.expire_time is not None:
        message.expire_time.CopyFrom(to_timestamp(key.expire_time))
    if key.revoke_time is not None:
        message.revoke_time.CopyFrom(to_timestamp(key.revoke_time))
    if key.last_used_time is not None:
        message.last_used_time.CopyFrom(to_timestamp(key.last_used_time))
    return message


def usage_kind_from_proto(value: int) -> UsageKind:
    try:
        return UsageKind(value)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown usage kind {value}; use one of {', '.join(k.name for k in UsageKind)}"
        ) from None


def usage_query_from_proto(request: pb.GetUsageRequest) -> UsageQuery:
    granularity = _GRANULARITY.get(request.granularity)
    if granularity is None:
        raise InvalidArgumentError(f"unknown granularity {request.granularity}")
    return UsageQuery(
        organization_id=request.organization_id,
        api_key_id=request.api_key_id,
        kinds=tuple(dict.fromkeys(usage_kind_from_proto(k) for k in request.kinds)),
        start=time_from_proto(request.start_time, "start_time") if request.HasField("start_time") else None,
        end=time_from_proto(request.end_time, "end_time") if request.HasField("end_time") else None,
        granularity=granularity,
        group_by_api_key=request.group_by_api_key,
    )


def usage_total_to_proto(total: UsageTotal) -> pb.UsageTotal:
    return pb.UsageTotal(
        kind=total.kind.value,
        api_key_id=total.api_key_id,
        period_start=to_timestamp(total.period_start),
        period_end=to_timestamp(total.period_end),
        quantity=total.quantity,
    )


def quota_status_to_proto(status: QuotaStatus) -> pb.QuotaStatus:
    return pb.QuotaStatus(
        quota=pb.Quota(kind=status.quota.kind.value, period=status.quota.period.value, limit=status.quota.limit),
        used=status.used,
        remaining=status.remaining,
        period_end=to_timestamp(status.period_end),
    )
