"""API keys on the labeling service, over real gRPC: the shared auth suite (UNAUTHENTICATED, PERMISSION_DENIED),
another organisation's project answering NOT_FOUND like a missing one, and the read/write split of scopes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.core.auth import LABELING_READ, LABELING_WRITE, TRAINING_SUBMIT
from gristmill.core.host import Infrastructure
from gristmill.labeling.app import METHOD_SCOPES, build_app
from gristmill.labeling.settings import LabelingSettings
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


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, InMemoryKeyVerifier]]:
    keys = InMemoryKeyVerifier()
    host = build_app(
        LabelingSettings(data_dir=tmp_path, grpc_port=0), Infrastructure(), api_key_security(keys, METHOD_SCOPES)
    ).host
    port = await host.start()
    yield f"127.0.0.1:{port}", keys
    await host.stop()


def _project(project_id: str) -> pb.CreateProjectRequest:
    return pb.CreateProjectRequest(
        project_id=project_id,
        display_name="Reviews",
        task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
        labels=[pb.LabelDefinition(name="neg"), pb.LabelDefinition(name="pos")],
    )


class TestLabelingAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self, server: tuple[str, InMemoryKeyVerifier]) -> AuthSubject:
        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await pb_grpc.LabelingServiceStub(channel).ListProjects(pb.ListProjectsRequest(), metadata=metadata)

        return key_subject(*server, call, LABELING_READ, TRAINING_SUBMIT)


class TestLabelingCrossOrg(CrossOrgContract):
    @pytest.fixture
    async def cross_org_subject(self, server: tuple[str, InMemoryKeyVerifier]) -> CrossOrgSubject:
        address, keys = server
        async with grpc.aio.insecure_channel(address) as channel:
            owner = bearer(keys.issue("acme", {LABELING_WRITE}))
            await pb_grpc.LabelingServiceStub(channel).CreateProject(_project("reviews"), metadata=owner)

        async def issue(org: str) -> str:
            return keys.issue(org, {LABELING_READ})

        async def read(channel: grpc.aio.Channel, metadata: Metadata, name: str) -> object:
            return await pb_grpc.LabelingServiceStub(channel).GetProject(
                pb.GetProjectRequest(project_id=name), metadata=metadata
            )

        return CrossOrgSubject(address, "acme", "globex", read, "reviews", "no-such-project", issue)


class TestLabelingScopeTable(ScopeTableContract):
    @pytest.fixture
    def scope_table(self) -> tuple[Sequence[ServiceDescriptor], Mapping[str, str]]:
        return [pb.DESCRIPTOR.services_by_name["LabelingService"]], METHOD_SCOPES


async def test_reading_needs_labeling_read_and_changing_needs_labeling_write(
    server: tuple[str, InMemoryKeyVerifier],
) -> None:
    address, keys = server
    reader = bearer(keys.issue("acme", {LABELING_READ}))
    writer = bearer(keys.issue("acme", {LABELING_WRITE}))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LabelingServiceStub(channel)
        denied = await refused(stub.CreateProject(_project("reviews"), metadata=reader))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED and "labeling:write" in (denied.details() or "")
        assert not (await stub.ListProjects(pb.ListProjectsRequest(), metadata=reader)).projects
        await stub.CreateProject(_project("reviews"), metadata=writer)
        # Same organisation: the reader sees what the writer made; another organisation sees nothing.
        listed = await stub.ListProjects(pb.ListProjectsRequest(), metadata=reader)
        assert [p.project_id for p in listed.projects] == ["reviews"]
        stranger = bearer(keys.issue("globex", {LABELING_READ}))
        assert not (await stub.ListProjects(pb.ListProjectsRequest(), metadata=stranger)).projects
