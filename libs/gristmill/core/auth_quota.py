"""Plans, quotas and rate limits, enforced per call by the service that does the work (serving, training).

An organisation's ``Plan`` (kept by the admin service) has quotas (at most one per usage kind and calendar
period, in UTC) and an optional prediction rate limit (a token bucket). A service checks them with one
``QuotaGuard`` per process::

    with guard.reserve(current_principal(), {UsageKind.PREDICTIONS: len(texts)}, resource=f"deployment/{name}"):
        result = predict(texts)          # an exception here releases the reservation: nothing is counted

``reserve`` refuses with RESOURCE_EXHAUSTED and a retry-after hint (the end of the quota's period, or
when the bucket has a token again) when the call would go beyond a quota or the rate. On success the
usage is committed: counted locally and published as a ``UsageRecorded`` event through the outbox (the
metering aggregator sums those), so usage totals equal the successful calls exactly.

The hot path (serving) uses ``reserve_async`` and ``Reservation.commit_async``: the decision is taken on the
event loop from what the guard already knows (the organisation's plan and its counters), and only the first
call of an organisation in a period goes to a worker thread to ask the admin service. Usage is then committed
by ``UsageRecorder.commit_grouped``: the calls that finish while one write is in progress wait together on
the next one (group commit), and their usage is summed into one event per (organisation, key, resource)
carrying every kind: one transaction and one event per batch instead of one per prediction and kind, and no call
is answered before its usage is durable.

How a guard knows what was used before: the first reservation of an organisation in a period asks the
``UsageSource`` (the metering service) for the period's total, then counts its own commits on top, and
``refresh`` (every ``refresh_s``, in the background) raises each counter to the admin's total when that is
higher. Each counter is therefore a lower bound of the true usage (a call is never refused while the quota has
room), and exact for one replica (the admin's total never exceeds what the replica counted itself). Several
replicas each see the others' usage once it has reached the admin's aggregator and their next refresh. With R
replicas admitting r calls per second each, A the time from a commit to the aggregator counting it (the
serving outbox's linger, the relay, the aggregator) and L = A + ``refresh_s``, a quota of N admits at most
N + (R - 1) x r x L + r x A calls: the others' calls not yet seen, plus the replica's own last A seconds, which a
refresh that raises the counter to the admin's total drops until they are aggregated. The rate limit is per
replica (R replicas allow R times the rate). See services/admin/README.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from types import TracebackType

from sqlalchemy.orm import Session

from gristmill.api.admin.v1 import admin_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth import Principal
from gristmill.core.errors import GristmillError, InvalidArgumentError, ResourceExhaustedError, UnavailableError
from gristmill.core.events import Event, EventCatalog, Outbox, OutboxWriter
from gristmill.core.sql import Database
from gristmill.core.values import utc_now

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
MonotonicClock = Callable[[], float]
# Organisations whose counters the background refresh keeps current: those that made a call this recently.
ACTIVE_FOR_S = 300.0


class UsageKind(Enum):
    PREDICTIONS = admin_pb2.USAGE_KIND_PREDICTIONS
    INPUT_TOKENS = admin_pb2.USAGE_KIND_INPUT_TOKENS
    TRAINING_WORKER_SECONDS = admin_pb2.USAGE_KIND_TRAINING_WORKER_SECONDS
    OUTPUT_TOKENS = admin_pb2.USAGE_KIND_OUTPUT_TOKENS

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


class QuotaPeriod(Enum):
    HOUR = admin_pb2.QUOTA_PERIOD_HOUR
    DAY = admin_pb2.QUOTA_PERIOD_DAY
    MONTH = admin_pb2.QUOTA_PERIOD_MONTH


def period_bounds(period: QuotaPeriod, at: datetime) -> tuple[datetime, datetime]:
    """The calendar period (UTC) containing ``at``: [start, end)."""
    at = at.astimezone(UTC)
    if period is QuotaPeriod.HOUR:
        start = at.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if period is QuotaPeriod.DAY:
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


@dataclass(frozen=True)
class Quota:
    kind: UsageKind
    period: QuotaPeriod
    # The largest total allowed in one period.
    limit: float


@dataclass(frozen=True)
class RateLimit:
    requests_per_second: float
    # Bucket size; 0 means max(1, requests_per_second).
    burst: int = 0

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst > 0 else max(1.0, self.requests_per_second)


@dataclass(frozen=True)
class Plan:
    """Quotas and rate limits of an organisation; an empty plan is unlimited."""

    name: str = ""
    quotas: tuple[Quota, ...] = ()
    prediction_rate_limit: RateLimit | None = None

    def validate(self) -> Plan:
        """The plan if it is consistent; INVALID_ARGUMENT naming the problem otherwise."""
        if len(self.name) > 64:
            raise InvalidArgumentError("plan name must be at most 64 characters")
        seen: set[tuple[UsageKind, QuotaPeriod]] = set()
        for quota in self.quotas:
            if not quota.limit >= 0:  # also refuses NaN
                raise InvalidArgumentError(
                    f"quota limit for {quota.kind.label} per {quota.period.name.lower()} must be zero or more "
                    f"(got {quota.limit})"
                )
            if (quota.kind, quota.period) in seen:
                raise InvalidArgumentError(
                    f"the plan has two quotas for {quota.kind.label} per {quota.period.name.lower()}; keep one"
                )
            seen.add((quota.kind, quota.period))
        rate = self.prediction_rate_limit
        if rate is not None and (not rate.requests_per_second > 0 or rate.burst < 0):
            raise InvalidArgumentError(
                "prediction_rate_limit needs requests_per_second above 0 and a burst of 0 or more "
                "(leave it out for no rate limit)"
            )
        return self


def plan_from_proto(message: admin_pb2.Plan) -> Plan:
    """A plan from the API, validated; INVALID_ARGUMENT for unknown kinds or periods and bad limits."""
    quotas = []
    for quota in message.quotas:
        try:
            kind = UsageKind(quota.kind)
        except ValueError:
            raise InvalidArgumentError(
                f"unknown usage kind {quota.kind} in a quota; use one of {[k.name for k in UsageKind]}"
            ) from None
        try:
            period = QuotaPeriod(quota.period)
        except ValueError:
            raise InvalidArgumentError(
                f"unknown quota period {quota.period} in a quota; use one of {[p.name for p in QuotaPeriod]}"
            ) from None
        quotas.append(Quota(kind, period, quota.limit))
    rate = None
    if message.HasField("prediction_rate_limit"):
        rate = RateLimit(message.prediction_rate_limit.requests_per_second, message.prediction_rate_limit.burst)
    return Plan(message.name, tuple(quotas), rate).validate()


def plan_to_proto(plan: Plan) -> admin_pb2.Plan:
    message = admin_pb2.Plan(
        name=plan.name,
        quotas=[admin_pb2.Quota(kind=q.kind.value, period=q.period.value, limit=q.limit) for q in plan.quotas],
    )
    if plan.prediction_rate_limit is not None:
        message.prediction_rate_limit.CopyFrom(
            admin_pb2.RateLimit(
                requests_per_second=plan.prediction_rate_limit.requests_per_second,
                burst=plan.prediction_rate_limit.burst,
            )
        )
    return message


class PlanSource(ABC):
    """Where a guard reads an organisation's plan (the admin service)."""

    @abstractmethod
    def plan_for(self, organization_id: str) -> Plan:
        """The organisation's plan (the empty plan, unlimited, when none was set)."""

    def close(self) -> None:
        """Release what the source holds (a channel to the admin service); nothing by default."""
        return None


class UsageSource(ABC):
    """Where a guard reads what was used before it started counting (the metering aggregator)."""

    @abstractmethod
    def used(self, organization_id: str, kind: UsageKind, start: datetime, end: datetime) -> float:
        """Total usage of ``kind`` by the organisation in [start, end)."""

    def close(self) -> None:
        """Release what the source holds (a channel to the admin service); nothing by default."""
        return None


@dataclass(frozen=True)
class UsageRecord:
    organization_id: str
    api_key_id: str
    kind: UsageKind
    quantity: float
    resource: str


class UsageRecorder:
    """Publishes usage as ``UsageRecorded`` events through the outbox of the service's database."""

    def __init__(self, database: Database, catalog: EventCatalog, source: str) -> None:
        self._database = database
        self._events = OutboxWriter(catalog, source)
        # Group commit (``commit_grouped``): records waiting for the next write, with their callers' futures.
        self._waiting: list[tuple[Sequence[UsageRecord], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        # Transactions written by the group commit, and the calls they carried (the benchmark reports them).
        self.group_commits = 0
        self.grouped_calls = 0

    def add(self, session: Session, records: Sequence[UsageRecord]) -> None:
        """Stage the events in the caller's transaction: one per (organisation, key, resource), summed."""
        Outbox.add_many(session, self._events_of(records))

    def record(self, records: Sequence[UsageRecord], session: Session | None = None) -> None:
        """Write the events, in ``session`` when given (commits with the caller's change), else on their own
        (``Outbox.write_now``: the cheapest commit; a call's usage is written before its answer)."""
        if session is not None:
            self.add(session, records)
            return
        Outbox.write_now(self._database, self._events_of(records))

    def _events_of(self, records: Sequence[UsageRecord]) -> list[Event]:
        """One event per (organisation, key, resource), its kinds summed: a call's predictions and input tokens
        travel as one record (every row, record and aggregator step costs per event, not per kind)."""
        totals: dict[tuple[str, str, str], dict[UsageKind, float]] = defaultdict(lambda: defaultdict(float))
        for record in records:
            if record.quantity > 0:  # the event's quantities are positive by contract; zero usage is no usage
                totals[(record.organization_id, record.api_key_id, record.resource)][record.kind] += record.quantity
        events = []
        for (organization_id, api_key_id, resource), amounts in totals.items():
            (kind, quantity), *more = amounts.items()
            message = events_pb2.UsageRecorded(
                organization_id=organization_id,
                api_key_id=api_key_id,
                kind=kind.value,
                quantity=quantity,
                resource=resource,
                more=[events_pb2.UsageAmount(kind=k.value, quantity=q) for k, q in more],
            )
            events.append(self._events.event(message, key=organization_id))
        return events

    async def commit_grouped(self, records: Sequence[UsageRecord]) -> None:
        """Write ``records`` together with those of the calls waiting at the same time; return once they are
        committed. UNAVAILABLE (nothing written for any call of the batch) when the database fails.

        While one transaction is being written, the calls that finish meanwhile queue; the next transaction
        takes them all. One caller alone waits for its own commit only (no lingering), and under load the
        batch grows with the load: one commit (and one worker-thread hop) per batch, not per call.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((records, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_waiting())
        await future

    async def _write_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                error: BaseException | None = None
                try:
                    await asyncio.to_thread(self.record, [r for records, _ in batch for r in records])
                except Exception as exc:
                    log.warning("could not record the usage of %d calls: %s", len(batch), exc)
                    error = (
                        exc
                        if isinstance(exc, GristmillError)
                        else UnavailableError(f"could not record the usage of this call, so it was not answered: {exc}")
                    )
                else:
                    self.group_commits += 1
                    self.grouped_calls += len(batch)
                for _, future in batch:
                    if future.done():  # the caller was cancelled; its usage is committed all the same
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        finally:
            self._writer = None


def _check_amounts(amounts: Mapping[UsageKind, float]) -> None:
    for kind, quantity in amounts.items():
        if not quantity >= 0:
            raise InvalidArgumentError(f"usage of {kind.label} must be zero or more (got {quantity})")


def _wanted(plan: Plan, amounts: Mapping[UsageKind, float], now: datetime) -> list[tuple[Quota, datetime, datetime]]:
    """The plan's quotas a call asking ``amounts`` is checked against, with their current periods.

    A kind asked with 0 is still checked: usage measured only after the work (input tokens) is refused once
    earlier calls used the quota up.
    """
    return [(q, *period_bounds(q.period, now)) for q in plan.quotas if q.kind in amounts]


@dataclass
class _Counter:
    used: float
    reserved: float = 0.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class Reservation:
    """Usage admitted but not yet counted. ``commit`` counts it (and publishes it); ``release`` forgets it.

    As a context manager: committed when the block succeeds, released when it raises.
    """

    guard: QuotaGuard
    organization_id: str
    api_key_id: str
    amounts: Mapping[UsageKind, float]
    resource: str
    _keys: tuple[tuple[str, UsageKind, QuotaPeriod, datetime], ...] = ()
    _done: bool = field(default=False, init=False)
    # What the work turned out to use, per kind (``commit(measured=...)``); the reserved amounts otherwise.
    _final: dict[UsageKind, float] = field(default_factory=dict, init=False)

    def used(self, kind: UsageKind) -> float:
        return self._final.get(kind, self.amounts.get(kind, 0.0))

    def records(self) -> list[UsageRecord]:
        return [
            UsageRecord(self.organization_id, self.api_key_id, kind, self.used(kind), self.resource)
            for kind in {**self.amounts, **self._final}
        ]

    def commit(self, session: Session | None = None, *, measured: Mapping[UsageKind, float] | None = None) -> None:
        """Count and publish the usage; ``measured`` replaces the reserved amount of kinds known only after the
        work (input tokens: reserve them as 0, commit what the tokenizer counted)."""
        if self._done:
            return
        try:
            self._measure(measured)
            if self.guard.recorder is not None:
                self.guard.recorder.record(self.records(), session)
        except BaseException:
            self.release()
            raise
        self._done = True
        self.guard._settle(self, counted=True)

    async def commit_async(self, *, measured: Mapping[UsageKind, float] | None = None) -> None:
        """``commit`` on the event loop: the usage is written by the recorder's group commit, together with the
        calls finishing at the same time; returns once it is durable."""
        if self._done:
            return
        try:
            self._measure(measured)
        except BaseException:
            self.release()
            raise
        if self.guard.recorder is not None:
            try:
                await self.guard.recorder.commit_grouped(self.records())
            except asyncio.CancelledError:
                # The caller went away while its usage was being written: the write goes on (the work was done),
                # so it counts here too, or this replica's counter would fall behind the admin's total.
                self._done = True
                self.guard._settle(self, counted=True)
                raise
            except BaseException:
                self.release()
                raise
        self._done = True
        self.guard._settle(self, counted=True)

    def _measure(self, measured: Mapping[UsageKind, float] | None) -> None:
        for kind, quantity in (measured or {}).items():
            if not quantity >= 0:
                raise InvalidArgumentError(f"usage of {kind.label} must be zero or more (got {quantity})")
            self._final[kind] = quantity

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        self.guard._settle(self, counted=False)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.release()


class QuotaGuard:
    """Admits or refuses work against the caller's organisation's plan; one per service process."""

    def __init__(
        self,
        plans: PlanSource,
        usage: UsageSource,
        recorder: UsageRecorder | None,
        *,
        clock: Clock = utc_now,
        monotonic: MonotonicClock = time.monotonic,
        refresh_s: float = 1.0,
    ) -> None:
        self.plans = plans
        self.usage = usage
        self.recorder = recorder
        # How often ``refresh`` should run (the service runs it as a periodic task).
        self.refresh_s = refresh_s
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, UsageKind, QuotaPeriod, datetime], _Counter] = {}
        self._buckets: dict[str, _Bucket] = {}
        # The last plan read per organisation (what the event-loop path decides with; ``refresh`` renews it) and
        # when each organisation last made a call (``refresh`` keeps only active ones current).
        self._plans: dict[str, Plan] = {}
        self._active: dict[str, float] = {}
        self._refresh_failing = False

    def reserve(
        self,
        principal: Principal,
        amounts: Mapping[UsageKind, float],
        *,
        resource: str,
        rate_limited: bool = True,
    ) -> Reservation:
        """Admit ``amounts`` for the caller's organisation, or raise RESOURCE_EXHAUSTED with retry-after.

        Blocking: reads the plan and seeds counters from the sources (network calls) where needed.
        ``rate_limited`` calls take one token of the plan's prediction rate limit.
        """
        _check_amounts(amounts)
        org = principal.organization_id
        plan = self.plans.plan_for(org)
        now = self._clock()
        wanted = _wanted(plan, amounts, now)
        # Seed counters outside the lock: asking the metering service takes a network round trip.
        for quota, start, end in wanted:
            key = (org, quota.kind, quota.period, start)
            if key not in self._counters:
                seed = self.usage.used(org, quota.kind, start, end)
                with self._lock:
                    self._counters.setdefault(key, _Counter(used=seed))
        with self._lock:
            self._plans[org] = plan
            self._forget_past_periods(now)
            return self._admit(principal, plan, amounts, wanted, now, resource, rate_limited)

    def try_reserve(
        self,
        principal: Principal,
        amounts: Mapping[UsageKind, float],
        *,
        resource: str,
        rate_limited: bool = True,
    ) -> Reservation | None:
        """``reserve`` from what the guard already knows, without blocking (on the event loop); None when it
        would have to ask the admin service first (the organisation's first call, or a new period)."""
        _check_amounts(amounts)
        org = principal.organization_id
        with self._lock:
            plan = self._plans.get(org)
            if plan is None:
                return None
            now = self._clock()
            wanted = _wanted(plan, amounts, now)
            if any((org, quota.kind, quota.period, start) not in self._counters for quota, start, _ in wanted):
                return None
            return self._admit(principal, plan, amounts, wanted, now, resource, rate_limited)

    async def reserve_async(
        self,
        principal: Principal,
        amounts: Mapping[UsageKind, float],
        *,
        resource: str,
        rate_limited: bool = True,
    ) -> Reservation:
        """``reserve`` for the event loop: decided inline when the guard knows enough, in a worker thread when it
        has to ask the admin service (once per organisation and period)."""
        reservation = self.try_reserve(principal, amounts, resource=resource, rate_limited=rate_limited)
        if reservation is None:
            reservation = await asyncio.to_thread(
                self.reserve, principal, amounts, resource=resource, rate_limited=rate_limited
            )
        return reservation

    def refresh(self, _first: bool = False) -> None:
        """Renew the plans and usage totals of the organisations active in the last ``ACTIVE_FOR_S`` seconds
        from the sources: each counter rises to the admin's total when that is higher (another replica's usage),
        never falls (its own commits not aggregated yet). Blocking; the service runs it every ``refresh_s``.
        A source that does not answer keeps what was known (logged once)."""
        now_m = self._monotonic()
        with self._lock:
            self._forget_past_periods(self._clock())
            for org in [o for o, at in self._active.items() if now_m - at > ACTIVE_FOR_S]:
                del self._active[org]
                self._plans.pop(org, None)
                self._buckets.pop(org, None)
                for key in [k for k, c in self._counters.items() if k[0] == org and not c.reserved]:
                    del self._counters[key]
            orgs = list(self._active)
            keys = [key for key in self._counters if key[0] in self._active]
        try:
            for org in orgs:
                plan = self.plans.plan_for(org)
                with self._lock:
                    self._plans[org] = plan
            for key in keys:
                org, kind, period, start = key
                total = self.usage.used(org, kind, start, period_bounds(period, start)[1])
                with self._lock:
                    counter = self._counters.get(key)
                    if counter is not None and total > counter.used:
                        counter.used = total
        except GristmillError as exc:
            if not self._refresh_failing:
                log.warning("quota refresh failed (deciding with what is known until it works again): %s", exc)
            self._refresh_failing = True
            return
        if self._refresh_failing:
            log.info("quota refresh works again")
        self._refresh_failing = False

    def _admit(
        self,
        principal: Principal,
        plan: Plan,
        amounts: Mapping[UsageKind, float],
        wanted: Sequence[tuple[Quota, datetime, datetime]],
        now: datetime,
        resource: str,
        rate_limited: bool,
    ) -> Reservation:
        """The decision, under the lock, on counters that exist."""
        org = principal.organization_id
        self._active[org] = self._monotonic()
        bucket = None
        if rate_limited and plan.prediction_rate_limit is not None:
            bucket = self._refill(org, plan.prediction_rate_limit)
            if bucket.tokens < 1:
                wait = (1 - bucket.tokens) / plan.prediction_rate_limit.requests_per_second
                raise ResourceExhaustedError(
                    f"organisation {org} is over its rate limit of "
                    f"{plan.prediction_rate_limit.requests_per_second:g} requests per second: retry later",
                    retry_after_s=wait,
                    details={"quota": "prediction_rate_limit"},
                )
        for quota, start, end in wanted:
            counter = self._counters[(org, quota.kind, quota.period, start)]
            asked = amounts[quota.kind]
            if counter.used + counter.reserved + asked > quota.limit:
                left = max(0.0, quota.limit - counter.used - counter.reserved)
                raise ResourceExhaustedError(
                    f"organisation {org} has used its {quota.kind.label} quota for this "
                    f"{quota.period.name.lower()} ({left:g} of {quota.limit:g} left, this call needs {asked:g}); "
                    f"it resets at {end.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                    retry_after_s=(end - now).total_seconds(),
                    details={"quota": f"{quota.kind.name.lower()}/{quota.period.name.lower()}"},
                )
        # Everything passed: take the token and reserve.
        if bucket is not None:
            bucket.tokens -= 1
        keys = []
        for quota, start, _end in wanted:
            key = (org, quota.kind, quota.period, start)
            self._counters[key].reserved += amounts[quota.kind]
            keys.append(key)
        return Reservation(self, org, principal.api_key_id, dict(amounts), resource, tuple(keys))

    def close(self) -> None:
        """Close the plan and usage sources (at service shutdown)."""
        self.plans.close()
        self.usage.close()

    def _refill(self, org: str, rate: RateLimit) -> _Bucket:
        now = self._monotonic()
        bucket = self._buckets.get(org)
        if bucket is None:
            bucket = self._buckets[org] = _Bucket(rate.capacity, now)
        bucket.tokens = min(rate.capacity, bucket.tokens + (now - bucket.updated) * rate.requests_per_second)
        bucket.updated = now
        return bucket

    def _forget_past_periods(self, now: datetime) -> None:
        stale = [key for key in self._counters if period_bounds(key[2], key[3])[1] <= now]
        for key in stale:
            del self._counters[key]

    def _settle(self, reservation: Reservation, *, counted: bool) -> None:
        with self._lock:
            for key in reservation._keys:
                counter = self._counters.get(key)
                if counter is None:
                    continue  # the period ended meanwhile
                counter.reserved = max(0.0, counter.reserved - reservation.amounts[key[1]])
                if counted:
                    counter.used += reservation.used(key[1])
