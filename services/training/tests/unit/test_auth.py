"""API keys on the training service, over real gRPC: the shared auth suite, and another organisation's job
answering NOT_FOUND exactly like a missing one (also to cancel and to watch it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.auth import LABELING_READ, TRAINING_SUBMIT
from gristmill.core.host import Infrastructure, ServiceHost
from gristmill.training.app import METHOD_SCOPES, build_app
from gristmill.training.settings import TrainingSettings
from services.training.tests.service_support import ScriptedRunner, job_spec
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
)

Server = tuple[str, InMemoryKeyVerifier, ServiceHost]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    keys = InMemoryKeyVerifier()
    runner = ScriptedRunner()
    host = build_app(
        TrainingSettings(data_dir=tmp_path / "data", grpc_port=0),
        Infrastructure(),
        api_key_security(keys, METHOD_SCOPES),
        runner=runner,
    ).host
    port = await host.start()
    yield f"127.0.0.1:{port}", keys, host
    runner.release.set()
    await host.stop()


class TestTrainingAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self, server: Server) -> AuthSubject:
        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await pb_grpc.TrainingServiceStub(channel).ListJobs(pb.ListJobsRequest(), metadata=metadata)

        return key_subject(*server[:2], call, TRAINING_SUBMIT, LABELING_READ)


@pytest.fixture
async def acme_job(server: Server, tiny_model: Path, sentiment_version: Callable[..., Any]) -> str:
    address, keys, host = server
    sentiment_version(host.platform.objects)
    async with grpc.aio.insecure_channel(address) as channel:
        job = await pb_grpc.TrainingServiceStub(channel).SubmitJob(
            pb.SubmitJobRequest(spec=job_spec(tiny_model)), metadata=bearer(keys.issue("acme", {TRAINING_SUBMIT}))
        )
    return job.job_id


class TestTrainingCrossOrg(CrossOrgContract):
    @pytest.fixture
    async def cross_org_subject(self, server: Server, acme_job: str) -> CrossOrgSubject:
        address, keys, _ = server

        async def issue(org: str) -> str:
            return keys.issue(org, {TRAINING_SUBMIT})

        async def read(channel: grpc.aio.Channel, metadata: Metadata, name: str) -> object:
            return await pb_grpc.TrainingServiceStub(channel).GetJob(pb.GetJobRequest(job_id=name), metadata=metadata)

        return CrossOrgSubject(address, "acme", "globex", read, acme_job, "0123456789abcdef", issue)


class TestTrainingScopeTable(ScopeTableContract):
    @pytest.fixture
    def scope_table(self) -> tuple[Sequence[ServiceDescriptor], Mapping[str, str]]:
        return [pb.DESCRIPTOR.services_by_name["TrainingService"]], METHOD_SCOPES


async def test_another_organisation_can_neither_cancel_watch_nor_list_the_job(server: Server, acme_job: str) -> None:
    address, keys, _ = server
    stranger = bearer(keys.issue("globex", {TRAINING_SUBMIT}))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as cancel:
            await stub.CancelJob(pb.CancelJobRequest(job_id=acme_job), metadata=stranger)
        with pytest.raises(grpc.aio.AioRpcError) as watch:
            async for _ in stub.WatchJob(pb.WatchJobRequest(job_id=acme_job), metadata=stranger):
                pass
        assert cancel.value.code() == watch.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (await stub.ListJobs(pb.ListJobsRequest(), metadata=stranger)).jobs
        owner = bearer(keys.issue("acme", {TRAINING_SUBMIT}))
        job = await stub.GetJob(pb.GetJobRequest(job_id=acme_job), metadata=owner)
        assert job.state != pb.JOB_STATE_CANCELLED  # the stranger's cancel changed nothing
        assert [j.job_id for j in (await stub.ListJobs(pb.ListJobsRequest(), metadata=owner)).jobs] == [acme_job]
