"""Asking the admin service about keys, plans and usage, for services that do not own them.

``RemoteKeyVerifier`` verifies a presented key by calling ``AdminService.WhoAmI`` with it, and trusts the
answer (yes or no) for ``ttl_s`` seconds: a revoked key stops working within that time everywhere. The
cache is keyed by a SHA-256 of the key, so the secrets themselves are not kept in memory longer than a
call, and is bounded (oldest entries go first).

``RemotePlanSource`` and ``RemoteUsageSource`` feed a ``QuotaGuard`` (``gristmill.core.auth_quota``):
plans from ``AdminService.GetOrganization`` (cached for ``ttl_s``), usage so far from
``MeteringService.GetUsage``. Both call with the service's own key (``GRISTMILL_AUTH_SERVICE_KEY``, an
admin key of the root organisation).

They run in worker threads (the auth hook, ``asyncio.to_thread``), so they use blocking gRPC channels: a
``ReloadingChannel`` each, which presents renewed certificate files after SIGHUP (``gristmill.core.tls``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.admin.v1 import admin_pb2, admin_pb2_grpc
from gristmill.core.auth import DEV_PRINCIPAL, ApiKeyVerifier, Principal
from gristmill.core.auth_quota import Plan, PlanSource, UsageKind, UsageSource, plan_from_proto
from gristmill.core.errors import FailedPreconditionError, UnavailableError
from gristmill.core.tls import ReloadingChannel, TlsSettings

MonotonicClock = Callable[[], float]
V = TypeVar("V")


@dataclass(frozen=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float


class TtlCache(Generic[V]):
    """A small thread-safe cache whose entries expire ``ttl_s`` after they were stored."""

    def __init__(self, ttl_s: float, *, max_entries: int = 10_000, clock: MonotonicClock = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bool, V | None]:
        """(found, value); an expired entry is not found."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False, None
            if entry.expires_at <= self._clock():
                del self._entries[key]
                return False, None
            return True, entry.value

    def put(self, key: bytes, value: V) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries[key] = _Entry(value, self._clock() + self.ttl_s)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def bearer(api_key: str) -> tuple[tuple[str, str]]:
    """The call metadata that presents ``api_key``."""
    return (("authorization", f"Bearer {api_key}"),)


class RemoteKeyVerifier(ApiKeyVerifier):
    """Verifies keys with the admin service's WhoAmI, caching each answer for ``ttl_s`` seconds."""

    def __init__(
        self,
        address: str,
        *,
        ttl_s: float = 30.0,
        tls: TlsSettings | None = None,
        timeout_s: float = 5.0,
        clock: MonotonicClock = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._cache: TtlCache[Principal | None] = TtlCache(ttl_s, max_entries=max_entries, clock=clock)
        self._channel = ReloadingChannel(address, tls)
        # How many times the admin service was asked (tests check that the cache works).
        self.calls = 0

    def cached(self, api_key: str) -> tuple[bool, Principal | None]:
        return self._cache.get(_cache_key(api_key))

    def verify(self, api_key: str) -> Principal | None:
        found, cached = self.cached(api_key)
        if found:
            return cached
        principal = self._ask(api_key)
        self._cache.put(_cache_key(api_key), principal)
        return principal

    def _ask(self, api_key: str) -> Principal | None:
        self.calls += 1
        try:
            with self._channel.use() as channel:
                reply: admin_pb2.WhoAmIResponse = admin_pb2_grpc.AdminServiceStub(channel).WhoAmI(
                    admin_pb2.WhoAmIRequest(), metadata=bearer(api_key), timeout=self._timeout_s
                )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return None
            # Not the caller's fault, and not a "no": the caller may retry once the admin service answers.
            raise UnavailableError(
                f"cannot verify the API key now: the admin service at {self.address} answered "
                f"{code.name if code is not None else 'nothing'}"
            ) from None
        if reply.auth_disabled:
            return DEV_PRINCIPAL
        return Principal(reply.organization_id, reply.api_key_id, frozenset(reply.scopes))

    def close(self) -> None:
        self._channel.close()


def _cache_key(api_key: str) -> bytes:
    # The cache holds digests, never the secrets themselves.
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def _unavailable(what: str, address: str, exc: grpc.RpcError) -> UnavailableError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    hint = (
        ": check GRISTMILL_AUTH_SERVICE_KEY (a root-organisation admin key)"
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        else ""
    )
    return UnavailableError(
        f"cannot read {what} now: the admin service at {address} answered "
        f"{code.name if code is not None else 'nothing'}{hint}"
    )


class RemotePlanSource(PlanSource):
    """Organisations' plans from the admin service, each trusted for ``ttl_s`` seconds."""

    def __init__(
        self,
        address: str,
        service_key: str,
        *,
        ttl_s: float = 30.0,
        tls: TlsSettings | None = None,
        timeout_s: float = 5.0,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        self.address = address
        self._metadata = bearer(service_key)
        self._timeout_s = timeout_s
        self._cache: TtlCache[Plan] = TtlCache(ttl_s, clock=clock)
        self._channel = ReloadingChannel(address, tls)

    def plan_for(self, organization_id: str) -> Plan:
        key = organization_id.encode("utf-8")
        found, cached = self._cache.get(key)
        if found and cached is not None:
            return cached
        try:
            with self._channel.use() as channel:
                reply: admin_pb2.Organization = admin_pb2_grpc.AdminServiceStub(channel).GetOrganization(
                    admin_pb2.GetOrganizationRequest(organization_id=organization_id),
                    metadata=self._metadata,
                    timeout=self._timeout_s,
                )
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                # Fail closed: a key of an organisation the admin service does not know gets no free ride.
                raise FailedPreconditionError(
                    f"organisation {organization_id} is not known to the admin service, so it has no plan"
                ) from None
            raise _unavailable("the organisation's plan", self.address, exc) from None
        plan = plan_from_proto(reply.plan)
        self._cache.put(key, plan)
        return plan

    def close(self) -> None:
        self._channel.close()


class RemoteUsageSource(UsageSource):
    """Usage totals from the metering service (served by the admin service)."""

    def __init__(
        self,
        address: str,
        service_key: str,
        *,
        tls: TlsSettings | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.address = address
        self._metadata = bearer(service_key)
        self._timeout_s = timeout_s
        self._channel = ReloadingChannel(address, tls)

    def used(self, organization_id: str, kind: UsageKind, start: datetime, end: datetime) -> float:
        request = admin_pb2.GetUsageRequest(organization_id=organization_id, kinds=[kind.value])
        request.start_time.CopyFrom(to_timestamp(start))
        request.end_time.CopyFrom(to_timestamp(end))
        try:
            with self._channel.use() as channel:
                reply: admin_pb2.GetUsageResponse = admin_pb2_grpc.MeteringServiceStub(channel).GetUsage(
                    request, metadata=self._metadata, timeout=self._timeout_s
                )
        except grpc.RpcError as exc:
            raise _unavailable("usage so far", self.address, exc) from None
        return float(sum(total.quantity for total in reply.totals))

    def close(self) -> None:
        self._channel.close()


def to_timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
