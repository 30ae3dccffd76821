"""A failed Ray run becomes one line naming the worker and its error."""

from __future__ import annotations

from gristmill.training.runner.failures import describe_failure, storage_unreachable


class WorkerGroupFailure(Exception):
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors:\n...")
        self.worker_failures = failures


class ControllerFailure(Exception):
    def __init__(self, inner: BaseException) -> None:
        super().__init__("Training failed due to controller error")
        self.controller_failure = inner


def test_the_lowest_failing_rank_and_its_error_type_are_named() -> None:
    failure = WorkerGroupFailure({1: ValueError("late"), 0: RuntimeError("injected failure at step 2")})
    assert describe_failure(failure) == "worker 0 failed: RuntimeError: injected failure at step 2"


def test_a_remote_traceback_is_cut_to_its_last_line() -> None:
    remote = RuntimeError("ray::RayTrainWorker.run()\n  File 'loop.py', line 3\nValueError: label 7 out of range")
    assert describe_failure(WorkerGroupFailure({0: remote})) == "worker 0 failed: ValueError: label 7 out of range"


def test_controller_and_other_errors() -> None:
    assert describe_failure(ControllerFailure(TimeoutError("no placement group"))) == (
        "the Ray Train controller failed: TimeoutError: no placement group"
    )
    assert describe_failure(OSError("")) == "OSError"


S3_DOWN = (
    "When testing for existence of bucket 'gristmill': AWS Error NETWORK_CONNECTION during HeadBucket operation: "
    "curlCode: 7, Could not connect to server"
)


def test_an_unreachable_s3_server_is_told_apart_from_a_failing_job() -> None:
    # As Ray reported it in the chaos suite: the controller's storage check, or a worker's checkpoint upload.
    assert storage_unreachable(ControllerFailure(OSError(S3_DOWN)))
    assert storage_unreachable(WorkerGroupFailure({1: RuntimeError("late"), 0: OSError(S3_DOWN)}))
    wrapped = RuntimeError("the run failed")
    wrapped.__cause__ = OSError(S3_DOWN)
    assert storage_unreachable(wrapped)
    assert not storage_unreachable(WorkerGroupFailure({0: ValueError("label 7 out of range")}))
    assert not storage_unreachable(ControllerFailure(TimeoutError("no placement group")))


def test_workers_that_cannot_reach_each_other_are_not_a_storage_outage() -> None:
    # As Ray reported it on a cluster whose rank 0 advertised a loopback address to the other node's worker.
    gloo = RuntimeError(
        "Gloo connectFullMesh failed with [gloo/transport/tcp/pair.cc:152] timed out connecting: "
        "SO_ERROR: Connection refused, remote=[127.0.0.1]:24964"
    )
    assert not storage_unreachable(ControllerFailure(gloo))
    assert not storage_unreachable(WorkerGroupFailure({1: gloo}))
