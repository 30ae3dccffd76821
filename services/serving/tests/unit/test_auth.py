"""API keys and the licence on serving, over real gRPC: the shared auth suite on the typed API and on the Open
Inference Protocol, another organisation's deployment answering NOT_FOUND like a missing one, deployment changes
needing admin, open liveness probes, and the licence's max_serving_models and serving.canary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor

from gristmill.api.common.v1 import common_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from gristmill.api.serving.v1 import serving_pb2 as pb
from gristmill.api.serving.v1 import serving_pb2_grpc as pb_grpc
from gristmill.core.auth import ADMIN, REGISTRY_READ, SERVING_PREDICT
from gristmill.core.licensing import License, load_license
from gristmill.serving.app import METHOD_SCOPES, PUBLIC_METHODS
from services.serving.tests.support import ENTERPRISE, build_fake_host
from tests.contracts.auth import (
    AuthContract,
    AuthSubject,
    CrossOrgContract,
    CrossOrgSubject,
    InMemoryKeyVerifier,
    Metadata,
    ScopeTableContract,
    api_key_security,
    bearer,
    key_subject,
    refused,
)
from tests.support.licences import signed_license

Server = tuple[str, InMemoryKeyVerifier]


async def _start(tmp_path: Path, license_: License) -> AsyncIterator[Server]:
    keys = InMemoryKeyVerifier()
    security = api_key_security(keys, METHOD_SCOPES, public=PUBLIC_METHODS, license_=license_)
    host, _, _ = build_fake_host(tmp_path, security=security)
    port = await host.start()
    yield f"127.0.0.1:{port}", keys
    await host.stop()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async for started in _start(tmp_path, ENTERPRISE):
        yield started


def _create(name: str, **fields: object) -> pb.CreateDeploymentRequest:
    deployment = pb.Deployment(name=name, registered_model_name="sentiment", **fields)  # type: ignore[arg-type]
    return pb.CreateDeploymentRequest(deployment=deployment, wait_until_ready=True)


class TestServingAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self, server: Server) -> AuthSubject:
        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await pb_grpc.ServingServiceStub(channel).ListDeployments(
                pb.ListDeploymentsRequest(), metadata=metadata
            )

        return key_subject(*server, call, SERVING_PREDICT, REGISTRY_READ)


class TestOpenInferenceProtocolAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self, server: Server) -> AuthSubject:
        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            return await stub.ServerMetadata(oip.ServerMetadataRequest(), metadata=metadata)

        return key_subject(*server, call, SERVING_PREDICT, REGISTRY_READ)


class TestServingCrossOrg(CrossOrgContract):
    @pytest.fixture
    async def cross_org_subject(self, server: Server) -> CrossOrgSubject:
        address, keys = server
        async with grpc.aio.insecure_channel(address) as channel:
            owner = bearer(keys.issue("acme", {ADMIN}))
            await pb_grpc.ServingServiceStub(channel).CreateDeployment(_create("sentiment"), metadata=owner)

        async def issue(org: str) -> str:
            return keys.issue(org, {SERVING_PREDICT})

        async def read(channel: grpc.aio.Channel, metadata: Metadata, name: str) -> object:
            return await pb_grpc.ServingServiceStub(channel).Predict(
                pb.PredictRequest(model=name, texts=["great"]), metadata=metadata
            )

        return CrossOrgSubject(address, "acme", "globex", read, "sentiment", "no-such-deployment", issue)


class TestServingScopeTable(ScopeTableContract):
    @pytest.fixture
    def scope_table(self) -> tuple[Sequence[ServiceDescriptor], Mapping[str, str]]:
        return [
            pb.DESCRIPTOR.services_by_name["ServingService"],
            oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        ], METHOD_SCOPES


async def test_changing_deployments_needs_admin_and_liveness_needs_no_key(server: Server) -> None:
    address, keys = server
    predictor = bearer(keys.issue("acme", {SERVING_PREDICT}))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ServingServiceStub(channel)
        denied = await refused(stub.CreateDeployment(_create("sentiment"), metadata=predictor))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in (denied.details() or "")
        assert not (await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=predictor)).deployments
        probes = oip_grpc.GRPCInferenceServiceStub(channel)
        assert (await probes.ServerLive(oip.ServerLiveRequest())).live
        assert (await probes.ServerReady(oip.ServerReadyRequest())).ready


async def test_the_licence_limits_deployments_and_canaries_and_a_refusal_changes_nothing(tmp_path: Path) -> None:
    canary = pb.CanaryRoute(target=common_pb2.ModelVersionSelector(version=2), weight=0.1)
    async for address, keys in _start(tmp_path / "community", load_license(None, "")):
        admin = bearer(keys.issue("acme", {ADMIN}))
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ServingServiceStub(channel)
            denied = await refused(stub.CreateDeployment(_create("with-canary", canary=canary), metadata=admin))
            assert denied.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "serving.canary needs an enterprise licence" in (denied.details() or "")
            for n in range(2):  # the community edition serves two deployments
                await stub.CreateDeployment(_create(f"d{n}"), metadata=admin)
            denied = await refused(stub.CreateDeployment(_create("d2"), metadata=admin))
            assert denied.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "max_serving_models is 2 under the community edition" in (denied.details() or "")
            listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=admin)
            assert [d.name for d in listed.deployments] == ["d0", "d1"]
    licensed = signed_license(features={"serving.canary"}, limits={"max_serving_models": 3})
    async for address, keys in _start(tmp_path / "licensed", licensed):
        admin = bearer(keys.issue("acme", {ADMIN}))
        async with grpc.aio.insecure_channel(address) as channel:
            created = await pb_grpc.ServingServiceStub(channel).CreateDeployment(
                _create("with-canary", canary=canary), metadata=admin
            )
            assert created.canary.target.version == 2
