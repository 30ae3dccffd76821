"""Services that do not own the keys: RemoteKeyVerifier against the real admin service, and the one-line
wiring (build_auth_hook with GRISTMILL_AUTH_ADMIN_ADDRESS) passing the auth conformance suite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.core.auth import REGISTRY_READ, SERVING_PREDICT, AuthSettings, new_api_key
from gristmill.core.auth_remote import RemoteKeyVerifier
from gristmill.core.errors import UnavailableError
from gristmill.core.security import build_auth_hook
from services.admin.tests.support import RunningAdmin, bearer, running_admin
from tests.contracts.auth import AuthContract, AuthSubject, Metadata
from tests.support.sample_server import SERVICE, build_server

pytestmark = pytest.mark.integration


class Monotonic:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningAdmin]:
    async with running_admin(tmp_path) as running:
        await running.create_org("acme")
        yield running


async def _revoke(svc: RunningAdmin, secret: str) -> None:
    key_id = secret.split("_")[1]
    await svc.admin.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=key_id), metadata=bearer(svc.root_secret))


async def test_a_revoked_key_stops_working_within_the_ttl(svc: RunningAdmin) -> None:
    clock = Monotonic()
    verifier = RemoteKeyVerifier(svc.address, ttl_s=30, clock=clock)
    try:
        secret = await svc.create_key("acme", SERVING_PREDICT)
        # The verifier blocks (it runs in the auth hook's worker thread), so never on the event loop.
        principal = await asyncio.to_thread(verifier.verify, secret)
        assert principal is not None
        assert (principal.organization_id, principal.scopes) == ("acme", {SERVING_PREDICT})
        await _revoke(svc, secret)
        clock.now += 29.9
        assert await asyncio.to_thread(verifier.verify, secret) == principal, "still trusted within the TTL"
        assert verifier.calls == 1, "answered from the cache"
        clock.now += 0.1
        assert await asyncio.to_thread(verifier.verify, secret) is None, "asked again after the TTL: revoked"
        assert verifier.calls == 2
        unknown = new_api_key().secret
        assert await asyncio.to_thread(verifier.verify, unknown) is None
    finally:
        verifier.close()


async def test_an_unreachable_admin_service_is_unavailable_not_unauthenticated(tmp_path: Path) -> None:
    verifier = RemoteKeyVerifier("127.0.0.1:1", ttl_s=30, timeout_s=1)
    try:
        with pytest.raises(UnavailableError, match="cannot verify the API key now"):
            await asyncio.to_thread(verifier.verify, new_api_key().secret)
    finally:
        verifier.close()


class TestSampleServerWithRemoteKeys(AuthContract):
    """Another service wired with the one-liner: its keys are checked by the admin service."""

    @pytest.fixture
    async def auth_subject(self, svc: RunningAdmin) -> AsyncIterator[AuthSubject]:
        # TTL 0: the suite expects a revocation to count at the next call.
        settings = AuthSettings(admin_address=svc.address, cache_ttl_s=0)
        hook = build_auth_hook(settings, method_scopes={f"/{SERVICE}/*": SERVING_PREDICT}, embedded=False)

        async def issue(org: str, scopes: frozenset[str]) -> str:
            return await svc.create_key(org, *scopes)

        async def revoke(secret: str) -> None:
            await _revoke(svc, secret)

        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            return await stub.ServerLive(oip.ServerLiveRequest(), metadata=metadata)

        async with build_server(auth_hook=hook) as server:
            yield AuthSubject(server.address, call, SERVING_PREDICT, REGISTRY_READ, "acme", issue, revoke)
