"""What auth and quotas cost per call, measured on real gRPC ports (in-process bus, SQLite).

    .venv/bin/python services/admin/benchmarks/auth_overhead.py [--calls 300]

Prints, for sequential unary calls of the sample server's ServerLive: no auth; keys checked by the admin
service on every call (TTL 0); keys checked remotely with the default 30 s cache; and the admin service's
own WhoAmI (local PBKDF2 check). Then the QuotaGuard's reserve + commit (one outbox write) per call.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.core.auth import SERVING_PREDICT, ApiKeyAuthHook, Principal, check_api_key, new_api_key
from gristmill.core.auth_quota import (
    Plan,
    PlanSource,
    Quota,
    QuotaGuard,
    QuotaPeriod,
    UsageKind,
    UsageRecorder,
    UsageSource,
)
from gristmill.core.auth_remote import RemoteKeyVerifier
from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from services.admin.tests.support import bearer, running_admin
from tests.support.sample_server import SERVICE, build_server


def _report(name: str, seconds: list[float]) -> None:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name:<44} p50 {statistics.median(ms):6.2f} ms   p99 {p99:6.2f} ms   ({len(ms)} calls)")


async def _time(calls: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(10):  # warm-up: channels, caches
        await call()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        out.append(time.perf_counter() - start)
    return out


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with running_admin(Path(tmp)) as svc:
            await svc.create_org("acme")
            secret = await svc.create_key("acme", SERVING_PREDICT)
            scopes = {f"/{SERVICE}/*": SERVING_PREDICT}
            variants: list[tuple[str, object]] = [
                ("sample ServerLive, no auth", None),
                ("sample ServerLive, remote check every call", RemoteKeyVerifier(svc.address, ttl_s=0)),
                ("sample ServerLive, remote check, 30 s cache", RemoteKeyVerifier(svc.address, ttl_s=30)),
            ]
            for name, verifier in variants:
                hook = None if verifier is None else ApiKeyAuthHook(verifier, scopes)  # type: ignore[arg-type]
                async with (
                    build_server(auth_hook=hook) as server,
                    grpc.aio.insecure_channel(server.address) as channel,
                ):
                    stub = oip_grpc.GRPCInferenceServiceStub(channel)
                    _report(
                        name,
                        await _time(
                            calls, lambda s=stub: s.ServerLive(oip.ServerLiveRequest(), metadata=bearer(secret))
                        ),
                    )
            who = lambda: svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(secret))  # noqa: E731
            _report("admin WhoAmI (local PBKDF2 check)", await _time(calls, who))

        key = new_api_key()
        start = time.perf_counter()
        for _ in range(100):
            check_api_key(key.secret, key.secret_hash)
        print(f"{'check_api_key (PBKDF2, 20k iterations)':<44} {(time.perf_counter() - start) * 10:6.2f} ms per check")
        start = time.perf_counter()
        for _ in range(10_000):
            hashlib.sha256(key.secret.encode()).digest()
        print(f"{'cache key (sha256)':<44} {(time.perf_counter() - start) * 100:6.2f} us per key")

        class Plans(PlanSource):
            def plan_for(self, organization_id: str) -> Plan:
                return Plan("big", (Quota(UsageKind.PREDICTIONS, QuotaPeriod.DAY, 1e9),))

        class NoUsage(UsageSource):
            def used(self, *args: object) -> float:
                return 0.0

        database = Database(f"sqlite:///{Path(tmp) / 'guard.db'}")
        database.create_all()
        guard = QuotaGuard(Plans(), NoUsage(), UsageRecorder(database, platform_catalog(), "bench"))
        caller = Principal("acme", key.api_key_id, frozenset({SERVING_PREDICT}))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            guard.reserve(caller, {UsageKind.PREDICTIONS: 1}, resource="deployment/d").commit()
            times.append(time.perf_counter() - start)
        _report("QuotaGuard reserve + commit (outbox write)", times)
        database.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    asyncio.run(main(parser.parse_args().calls))
