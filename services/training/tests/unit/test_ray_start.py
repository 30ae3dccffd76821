"""A Ray cluster that cannot start is UNAVAILABLE with its reason (never INTERNAL), and the background start
keeps retrying with backoff until it is up or stopped. ``ray.init`` itself is replaced: these are the
failures seen on loaded machines (the GCS port file not written in time), not a real cluster."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from gristmill.core.errors import UnavailableError
from gristmill.training.runner.ray_runner import RayCluster

GCS_TIMEOUT = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"


def failing_cluster(**kwargs: float) -> tuple[RayCluster, list[float]]:
    cluster = RayCluster(num_cpus=1, **kwargs)  # type: ignore[arg-type]
    calls: list[float] = []

    def init() -> None:
        calls.append(time.monotonic())
        raise RuntimeError(GCS_TIMEOUT)

    cluster._init = init  # type: ignore[method-assign]
    return cluster, calls


def test_a_failed_start_is_unavailable_with_the_reason() -> None:
    cluster, calls = failing_cluster()
    with pytest.raises(UnavailableError, match="could not start: RuntimeError: Timed out waiting for file"):
        cluster.capacity()
    assert len(calls) == 1 and cluster.last_failure.startswith("RuntimeError: Timed out")


def test_the_background_start_retries_with_backoff_and_callers_wait_then_get_unavailable() -> None:
    cluster, calls = failing_cluster(start_wait_s=0.5, retry_backoff_s=0.1, max_backoff_s=0.4)
    cluster.start_in_background()
    try:
        began = time.monotonic()
        with pytest.raises(UnavailableError, match="is not up yet: RuntimeError: Timed out .* keeps trying"):
            cluster.capacity()
        assert time.monotonic() - began >= 0.5, "a caller waits for the start in progress first"
        deadline = time.monotonic() + 10
        while len(calls) < 4:
            assert time.monotonic() < deadline, "the background start stopped retrying"
            time.sleep(0.02)
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert gaps[0] >= 0.1 and gaps[-1] >= gaps[0], f"backoff grows: {gaps}"
        assert max(gaps) < 1.0, f"backoff is capped: {gaps}"
    finally:
        cluster.stop()
    attempts = len(calls)
    time.sleep(0.6)
    assert len(calls) == attempts, "stop ends the retries"


def test_the_background_start_succeeds_once_ray_can_start() -> None:
    cluster, calls = failing_cluster(start_wait_s=5.0, retry_backoff_s=0.05)
    recovered = threading.Event()

    def init() -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError(GCS_TIMEOUT)
        recovered.set()

    cluster._init = init  # type: ignore[method-assign]
    # Ray is not really started here: ready means initialised, which the real init would have done.
    import ray

    original = ray.cluster_resources
    ray.cluster_resources = lambda: {"CPU": 1.0}  # type: ignore[assignment]
    try:
        cluster.start_in_background()
        cluster.start()  # waits for the background start instead of starting twice
        assert recovered.is_set() and len(calls) == 3 and cluster.last_failure == ""
    finally:
        ray.cluster_resources = original
        cluster._owned = False  # nothing real to shut down
        cluster.stop()


class FakeCluster:
    def __init__(self, address: str = "", fails: bool = False) -> None:
        self.address = address
        self.fails = fails
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")
        if self.fails:
            raise UnavailableError("the Ray cluster (local, 1 CPUs) could not start: Exception: timed out")

    def start_in_background(self) -> None:
        self.calls.append("background")


def test_the_host_starts_a_local_cluster_before_its_threads_and_retries_in_the_background() -> None:
    from gristmill.training.app import ClusterLifecycle

    local = FakeCluster()
    asyncio.run(ClusterLifecycle(local).open())
    assert local.calls == ["start"], "a local cluster starts at once, before the host's threads"
    failing = FakeCluster(fails=True)
    asyncio.run(ClusterLifecycle(failing).open())
    assert failing.calls == ["start", "background"], "a failed first start is retried in the background"
    remote = FakeCluster(address="127.0.0.1:6379")
    asyncio.run(ClusterLifecycle(remote).open())
    assert remote.calls == ["background"], "connecting forks nothing: the host need not wait for it"
