"""The training pages' domain over a fake training service: jobs as views (state, method, progress, metrics),
WatchJob's events as the dicts the page's script draws, Last-Event-ID checked before any call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.console.domain.jobs import JobView, Trainers, event_dict
from gristmill.console.domain.sessions import Session
from gristmill.core.errors import InvalidArgumentError

SESSION = Session("gmk_k.s", "ann", "acme", "k1", ("training:read",), auth_disabled=False)


class FakeTraining:
    def __init__(self, events: list[pb.JobEvent]) -> None:
        self.events = events
        self.requests: list[Any] = []

    async def ListJobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[pb.Job(job_id="j1"), pb.Job(job_id="j2")])

    def WatchJob(self, request: pb.WatchJobRequest) -> AsyncIterator[pb.JobEvent]:
        async def events() -> AsyncIterator[pb.JobEvent]:
            for event in self.events:
                if not request.HasField("after_sequence") or event.sequence > request.after_sequence:
                    yield event

        return events()


class FakeCalls:
    def __init__(self, training: FakeTraining) -> None:
        self.training = training
        self.keys: list[str] = []

    async def call(self, service: str, method: Callable[..., Awaitable[Any]], request: Any, api_key: str) -> Any:
        self.keys.append(api_key)
        self.training.requests.append(request)
        return await method(request)

    def stream(self, service: str, method: Callable[..., Any], request: Any, api_key: str) -> AsyncIterator[Any]:
        self.keys.append(api_key)
        self.training.requests.append(request)
        result: AsyncIterator[Any] = method(request)
        return result


def metrics(sequence: int, step: int, *values: tuple[str, float, int], trial: int | None = None) -> pb.JobEvent:
    report = pb.MetricsReport(
        step=step, epoch=step / 10, metrics=[common_pb2.Metric(name=n, value=v, split=s) for n, v, s in values]
    )
    if trial is not None:
        report.trial = trial
    return pb.JobEvent(job_id="j1", sequence=sequence, metrics=report)


def state(sequence: int, value: int, step: int = 0, total: int = 0) -> pb.JobEvent:
    change = pb.JobStateTransition(state=value, reason="why", progress=pb.JobProgress(step=step, total_steps=total))
    return pb.JobEvent(job_id="j1", sequence=sequence, state_change=change)


EVENTS = [
    state(1, pb.JOB_STATE_RUNNING, 0, 40),
    metrics(2, 10, ("loss", 0.7, common_pb2.DATASET_SPLIT_UNSPECIFIED)),
    metrics(3, 20, ("loss", 0.5, common_pb2.DATASET_SPLIT_VALIDATION), ("accuracy", 0.8, 2)),
    metrics(4, 20, ("loss", 0.6, 0), trial=3),
    state(5, pb.JOB_STATE_SUCCEEDED, 40, 40),
]


async def test_events_become_points_and_states_for_the_page() -> None:
    calls = FakeCalls(FakeTraining(EVENTS))
    seen = [e async for e in Trainers(calls).events(SESSION, "j1", None)]
    assert [e["sequence"] for e in seen] == [1, 2, 3, 4, 5]
    assert seen[0] == {
        "sequence": 1, "kind": "state", "state": "running", "finished": False, "reason": "why", "step": 0,
        "total_steps": 40,
    }  # fmt: skip
    assert seen[2]["metrics"] == {"validation loss": 0.5, "validation accuracy": 0.8} and seen[2]["step"] == 20
    assert seen[3]["metrics"] == {"trial 3: loss": 0.6}  # a search's trials are separate series
    assert seen[4]["state"] == "succeeded" and seen[4]["finished"] is True
    assert calls.keys == [SESSION.api_key]  # as the signed-in user


async def test_a_reconnecting_page_resumes_after_its_last_event() -> None:
    calls = FakeCalls(FakeTraining(EVENTS))
    seen = [e["sequence"] async for e in Trainers(calls).events(SESSION, "j1", "3")]
    assert seen == [4, 5]
    assert calls.training.requests[0].after_sequence == 3


async def test_a_last_event_id_that_is_not_a_sequence_is_refused_before_any_call() -> None:
    calls = FakeCalls(FakeTraining(EVENTS))
    with pytest.raises(InvalidArgumentError, match="Last-Event-ID"):
        async for _ in Trainers(calls).events(SESSION, "j1", "3; drop"):
            pass
    assert calls.training.requests == []


async def test_jobs_are_listed_as_the_service_orders_them() -> None:
    calls = FakeCalls(FakeTraining([]))
    jobs = await Trainers(calls).jobs(SESSION, "reviews")
    assert [j.job.job_id for j in jobs] == ["j1", "j2"]
    assert calls.training.requests[0].project_id == "reviews"


def test_a_job_view_names_its_method_progress_and_final_metrics() -> None:
    job = pb.Job(
        job_id="j1",
        state=pb.JOB_STATE_RUNNING,
        spec=pb.JobSpec(
            method=pb.TRAINING_METHOD_LORA,
            objective=pb.OBJECTIVE_SFT,
            base_model=common_pb2.BaseModelRef(base_model_name="smollm2"),
        ),
        progress=pb.JobProgress(step=10, total_steps=40),
        latest_metrics=[common_pb2.Metric(name="loss", value=0.4)],
    )
    view = JobView(job)
    assert (view.state, view.method, view.base_model, view.progress, view.name) == (
        "running", "lora, sft", "smollm2", 0.25, "j1",
    )  # fmt: skip
    assert view.metrics == [("loss", 0.4)] and not view.finished
    job.state = pb.JOB_STATE_SUCCEEDED
    job.result.metrics.add(name="accuracy", value=0.9, split=common_pb2.DATASET_SPLIT_TEST)
    assert view.progress == 1.0 and view.finished and view.metrics == [("test accuracy", 0.9)]
    assert JobView(pb.Job(job_id="j2")).method == "full, from the data"


def test_an_event_with_neither_kind_keeps_only_its_sequence() -> None:
    assert event_dict(pb.JobEvent(sequence=7)) == {"sequence": 7}
