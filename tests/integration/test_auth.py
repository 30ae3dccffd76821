"""The auth conformance suite on the bootstrap's sample server, and the principal reaching the servicer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from gristmill.core.auth import (
    REGISTRY_READ,
    SERVING_PREDICT,
    ApiKeyAuthHook,
    current_principal,
    optional_principal,
)
from gristmill.core.grpcserver import GrpcServer, ServiceRegistration
from tests.contracts.auth import AuthContract, AuthSubject, InMemoryKeyVerifier, Metadata, bearer
from tests.support.sample_server import SERVICE, build_server

pytestmark = pytest.mark.integration

SCOPES = {f"/{SERVICE}/*": SERVING_PREDICT}


class TestSampleServerAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self) -> AsyncIterator[AuthSubject]:
        keys = InMemoryKeyVerifier()

        async def issue(org: str, scopes: frozenset[str]) -> str:
            return keys.issue(org, scopes)

        async def revoke(secret: str) -> None:
            keys.revoke(secret)

        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), metadata=metadata)

        async with build_server(auth_hook=ApiKeyAuthHook(keys, SCOPES)) as server:
            yield AuthSubject(server.address, call, SERVING_PREDICT, REGISTRY_READ, "acme", issue, revoke)


class WhoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers with the caller it sees, in the servicer and in a worker thread, after a context switch."""

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        await asyncio.sleep(0.05)  # let the other concurrent calls run in between
        in_thread = await asyncio.to_thread(current_principal)
        here = current_principal()
        assert in_thread == here
        return pb.ModelMetadataResponse(name=here.organization_id, versions=[here.api_key_id])

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=optional_principal() is None)


async def test_each_call_sees_its_own_principal_in_the_servicer_and_its_threads() -> None:
    keys = InMemoryKeyVerifier()
    servicer = WhoServicer()
    registration = ServiceRegistration(
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        lambda server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server),
    )
    hook = ApiKeyAuthHook(keys, SCOPES, public={f"/{SERVICE}/ServerLive"})
    secrets = {org: keys.issue(org, {SERVING_PREDICT}) for org in ("acme", "globex", "initech")}
    # Interleaved, concurrent calls of three organisations.
    order = [org for _ in range(3) for org in secrets]
    async with (
        GrpcServer("who", [registration], auth_hook=hook) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = await asyncio.gather(
            *(stub.ModelMetadata(pb.ModelMetadataRequest(), metadata=bearer(secrets[org])) for org in order)
        )
        # A public method sees no principal, even right after authenticated calls.
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live is True
    key_ids = {org: principal.api_key_id for org, s in secrets.items() if (principal := keys.verify(s)) is not None}
    assert [(r.name, r.versions[0]) for r in replies] == [(org, key_ids[org]) for org in order]
