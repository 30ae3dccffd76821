"""API keys and the licence on the registry, over real gRPC: the shared auth suite, another organisation's
model answering NOT_FOUND like a missing one, reads vs promotion scopes, a root admin key acting for an
organisation (how serving reads a deployment's model), and the licence's max_registered_models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.auth import ACT_FOR_ORGANIZATION, ADMIN, REGISTRY_PROMOTE, REGISTRY_READ, SERVING_PREDICT
from gristmill.core.host import Infrastructure
from gristmill.core.licensing import License, load_license
from gristmill.registry.app import METHOD_SCOPES, RegistryApp, build_app
from gristmill.registry.settings import RegistrySettings
from services.registry.tests.api import SIG
from services.registry.tests.support import upload_model
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


async def _start(
    tmp_path: Path, license_: License | None = None
) -> AsyncIterator[tuple[str, InMemoryKeyVerifier, RegistryApp]]:
    keys = InMemoryKeyVerifier()
    app = build_app(
        RegistrySettings(data_dir=tmp_path, grpc_port=0),
        Infrastructure(),
        api_key_security(keys, METHOD_SCOPES, license_=license_),
    )
    port = await app.host.start()
    yield f"127.0.0.1:{port}", keys, app
    await app.host.stop()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async for address, keys, _ in _start(tmp_path):
        yield address, keys


def _model(name: str) -> pb.CreateRegisteredModelRequest:
    return pb.CreateRegisteredModelRequest(
        name=name,
        task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
        label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
    )


class TestRegistryAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self, server: Server) -> AuthSubject:
        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await pb_grpc.RegistryServiceStub(channel).SearchRegisteredModels(
                pb.SearchRegisteredModelsRequest(), metadata=metadata
            )

        return key_subject(*server, call, REGISTRY_READ, SERVING_PREDICT)


class TestRegistryCrossOrg(CrossOrgContract):
    @pytest.fixture
    async def cross_org_subject(self, server: Server) -> CrossOrgSubject:
        address, keys = server
        async with grpc.aio.insecure_channel(address) as channel:
            owner = bearer(keys.issue("acme", {REGISTRY_PROMOTE}))
            await pb_grpc.RegistryServiceStub(channel).CreateRegisteredModel(_model("sentiment"), metadata=owner)

        async def issue(org: str) -> str:
            return keys.issue(org, {REGISTRY_READ})

        async def read(channel: grpc.aio.Channel, metadata: Metadata, name: str) -> object:
            return await pb_grpc.RegistryServiceStub(channel).GetRegisteredModel(
                pb.GetRegisteredModelRequest(name=name), metadata=metadata
            )

        return CrossOrgSubject(address, "acme", "globex", read, "sentiment", "no-such-model", issue)


class TestRegistryScopeTable(ScopeTableContract):
    @pytest.fixture
    def scope_table(self) -> tuple[Sequence[ServiceDescriptor], Mapping[str, str]]:
        return [pb.DESCRIPTOR.services_by_name["RegistryService"]], METHOD_SCOPES


async def test_reading_needs_registry_read_and_changing_needs_registry_promote(server: Server) -> None:
    address, keys = server
    reader = bearer(keys.issue("acme", {REGISTRY_READ}))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        for call in (
            stub.CreateRegisteredModel(_model("sentiment"), metadata=reader),
            stub.SetAlias(
                pb.SetAliasRequest(registered_model_name="sentiment", alias="production", version=1), metadata=reader
            ),
        ):
            denied = await refused(call)
            assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "registry:promote" in (denied.details() or "")
        assert not (
            await stub.SearchRegisteredModels(pb.SearchRegisteredModelsRequest(), metadata=reader)
        ).registered_models


async def test_a_root_admin_key_may_act_for_an_organisation_and_no_other_key_may(server: Server) -> None:
    address, keys = server
    owner = bearer(keys.issue("acme", {REGISTRY_PROMOTE}))
    root_admin = keys.issue("default", {ADMIN})
    other_admin = keys.issue("globex", {ADMIN})
    as_acme = ((ACT_FOR_ORGANIZATION, "acme"),)
    get = pb.GetRegisteredModelRequest(name="sentiment")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        await stub.CreateRegisteredModel(_model("sentiment"), metadata=owner)
        # The root organisation's own view has no such model; acting for acme, it does.
        assert (await refused(stub.GetRegisteredModel(get, metadata=bearer(root_admin)))).code() == (
            grpc.StatusCode.NOT_FOUND
        )
        found = await stub.GetRegisteredModel(get, metadata=(*bearer(root_admin), *as_acme))
        assert found.name == "sentiment" and found.organization_id == "acme"
        # A garbage organisation id is refused before anything is read.
        bad = await refused(
            stub.GetRegisteredModel(get, metadata=(*bearer(root_admin), (ACT_FOR_ORGANIZATION, "Not An Org!")))
        )
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and ACT_FOR_ORGANIZATION in (bad.details() or "")
        # Another organisation's admin, or a root key without admin, is refused outright.
        for secret in (other_admin, keys.issue("default", {REGISTRY_READ})):
            denied = await refused(stub.GetRegisteredModel(get, metadata=(*bearer(secret), *as_acme)))
            assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
            assert ACT_FOR_ORGANIZATION in (denied.details() or "")


@pytest.mark.parametrize(
    ("license_", "allowed", "where"),
    [
        (signed_license(limits={"max_registered_models": 2}), 2, "licence lic-test"),
        (load_license(None, ""), 10, "the community edition"),
    ],
    ids=["licensed", "community"],
)
async def test_one_model_more_than_licensed_is_refused_and_changes_nothing(
    tmp_path: Path, license_: License, allowed: int, where: str
) -> None:
    async for address, keys, app in _start(tmp_path, license_):
        # Counted across organisations: the licence is the installation's.
        writers = [bearer(keys.issue(org, {REGISTRY_PROMOTE})) for org in ("acme", "globex")]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            for n in range(allowed):
                await stub.CreateRegisteredModel(_model(f"model-{n}"), metadata=writers[n % 2])
            denied = await refused(stub.CreateRegisteredModel(_model("one-more"), metadata=writers[0]))
            assert denied.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"max_registered_models is {allowed} under {where}" in (denied.details() or "")
            # A version registered with create_model_if_missing would make a new model too.
            ref = upload_model(app.host.platform.objects, "models/one-more")
            denied = await refused(
                stub.RegisterModelVersion(
                    pb.RegisterModelVersionRequest(
                        registered_model_name="one-more",
                        create_model_if_missing=True,
                        source_prefix="models/one-more",
                        manifest=common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes),
                        signature=SIG,
                        task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                        label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
                    ),
                    metadata=writers[0],
                )
            )
            assert denied.code() == grpc.StatusCode.FAILED_PRECONDITION, denied.details()
            assert "max_registered_models" in (denied.details() or "")
            missing = await refused(
                stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="one-more"), metadata=writers[0])
            )
            assert missing.code() == grpc.StatusCode.NOT_FOUND
