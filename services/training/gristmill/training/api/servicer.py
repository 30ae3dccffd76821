"""The TrainingService gRPC servicer: validate -> proto to domain -> domain -> domain to proto.

Blocking domain work (the store, reading the dataset and the base model) runs in ``asyncio.to_thread``.
Errors are ``gristmill.core.errors`` classes; the shared interceptor turns them into statuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.auth import current_organization, current_principal
from gristmill.core.errors import GristmillError, InvalidArgumentError
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.paging import fingerprint, next_page_token, page_request
from gristmill.training.api import convert
from gristmill.training.domain.jobs import JobService, SequenceAheadError
from gristmill.training.domain.model import JobTrigger
from gristmill.training.domain.ports import JobQuery


class OutOfRangeError(GristmillError):
    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.Job:
        if not request.HasField("spec"):
            raise InvalidArgumentError("spec is required", details={"field": "spec"})
        spec = convert.spec_from_proto(request.spec)
        job = await asyncio.to_thread(
            self._jobs.submit,
            spec,
            request_id=request.request_id,
            organization_id=current_organization(),
            trigger=JobTrigger(api_key_id=current_principal().api_key_id),
            caller=current_principal(),
        )
        return convert.job_to_proto(job)

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        job = await asyncio.to_thread(self._jobs.get, request.job_id, organization_id=current_organization())
        return convert.job_to_proto(job)

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        states = tuple(sorted({convert.state_from_proto(s) for s in request.states}))
        query_fingerprint = fingerprint("jobs", [[s.value for s in states], request.project_id])
        requested = page_request(request.page.page_size, request.page.page_token, query_fingerprint)
        query = JobQuery(
            organization_id=current_organization(),
            states=states,
            project_id=request.project_id,
            page_size=requested.size,
            offset=requested.offset,
        )
        page = await asyncio.to_thread(self._jobs.list, query)
        return pb.ListJobsResponse(
            jobs=[convert.job_to_proto(j) for j in page.jobs],
            next_page_token=next_page_token(
                None if page.next_offset is None else str(page.next_offset), query_fingerprint
            ),
        )

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.JobEvent]:
        after = request.after_sequence if request.HasField("after_sequence") else None
        try:
            async for event in self._jobs.watch(request.job_id, after, organization_id=current_organization()):
                yield convert.event_to_proto(event)
        except SequenceAheadError as exc:
            raise OutOfRangeError(exc.message, details={"field": "after_sequence"}) from None

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        job = await asyncio.to_thread(
            self._jobs.cancel, request.job_id, reason=request.reason, organization_id=current_organization()
        )
        return convert.job_to_proto(job)

    async def SetAutoTrainPolicy(self, request: pb.SetAutoTrainPolicyRequest, context: Any) -> pb.AutoTrainPolicy:
        policy = request.policy
        if not policy.HasField("job_template"):
            raise InvalidArgumentError("policy.job_template is required", details={"field": "policy.job_template"})
        template = convert.spec_from_proto(policy.job_template, require_dataset=False)
        saved = await asyncio.to_thread(
            self._jobs.set_policy,
            policy.project_id,
            enabled=policy.enabled,
            template=template,
            organization_id=current_organization(),
        )
        return convert.policy_to_proto(saved)

    async def GetAutoTrainPolicy(self, request: pb.GetAutoTrainPolicyRequest, context: Any) -> pb.AutoTrainPolicy:
        policy = await asyncio.to_thread(
            self._jobs.get_policy, request.project_id, organization_id=current_organization()
        )
        return convert.policy_to_proto(policy)

    async def DeleteAutoTrainPolicy(self, request: pb.DeleteAutoTrainPolicyRequest, context: Any) -> Empty:
        await asyncio.to_thread(self._jobs.delete_policy, request.project_id, organization_id=current_organization())
        return Empty()


def registration(servicer: TrainingServicer) -> ServiceRegistration:
    return ServiceRegistration(
        pb.DESCRIPTOR.services_by_name["TrainingService"],
        lambda server: pb_grpc.add_TrainingServiceServicer_to_server(servicer, server),
    )
