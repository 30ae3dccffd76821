"""The SDK over real gRPC: typed errors, API key, deadlines, retries on UNAVAILABLE, trace propagation."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as pb
from gristmill.client import (
    ClientOptions,
    DeadlineExceededError,
    Endpoints,
    Gristmill,
    GristmillError,
    NotFoundError,
    UnauthenticatedError,
)
from tests.conftest import REPO_ROOT
from tests.support.sample_server import ServerThread, build_server

pytestmark = pytest.mark.integration


def _client(port: int, **options: object) -> Gristmill:
    return Gristmill(Endpoints(serving=f"127.0.0.1:{port}"), ClientOptions(**options))  # type: ignore[arg-type]


def test_status_codes_become_typed_errors_with_details() -> None:
    with ServerThread(build_server()) as server, _client(server.port) as gm:
        assert gm.inference.ModelReady(pb.ModelReadyRequest(name="known")).ready
        with pytest.raises(NotFoundError) as err:
            gm.inference.ModelReady(pb.ModelReadyRequest(name="ghost"))
        assert str(err.value) == "model 'ghost' is not deployed"
        assert err.value.details == {"model": "ghost"}
        with pytest.raises(GristmillError, match="internal error"):
            gm.inference.ServerReady(pb.ServerReadyRequest())


def test_api_key_is_sent_as_bearer_metadata() -> None:
    seen: list[Sequence[tuple[str, str | bytes]]] = []

    def hook(method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        seen.append(metadata)
        if ("authorization", "Bearer gm_k1_secret") not in metadata:
            raise UnauthenticatedError("missing API key")

    with ServerThread(build_server(auth_hook=hook)) as server:
        with _client(server.port, api_key="gm_k1_secret") as gm:
            assert gm.inference.ServerLive(pb.ServerLiveRequest()).live
        with _client(server.port) as anonymous, pytest.raises(UnauthenticatedError, match="missing API key"):
            anonymous.inference.ServerLive(pb.ServerLiveRequest())
    assert seen, "the hook saw the calls"


def test_default_deadline_applies() -> None:
    with ServerThread(build_server()) as server, _client(server.port, timeout_s=0.3) as gm:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            gm.inference.ServerLive(pb.ServerLiveRequest(), metadata=(("x-delay-ms", "3000"),))
        assert time.monotonic() - started < 2


def test_unavailable_is_retried_with_backoff_until_the_server_is_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result: dict[str, object] = {}

    def call() -> None:
        with _client(port, max_attempts=8, backoff_s=0.2, max_backoff_s=1.0) as gm:
            try:
                result["live"] = gm.inference.ServerLive(pb.ServerLiveRequest()).live
            except GristmillError as exc:
                result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the first attempts fail: nothing listens yet
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sample_server", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        caller.join(timeout=30)
        assert result == {"live": True}
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_trace_context_reaches_the_server() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with (
        ServerThread(build_server(tracer_provider=provider)) as server,
        _client(server.port, tracer_provider=provider) as gm,
        provider.get_tracer("test").start_as_current_span("demo") as root,
    ):
        gm.inference.ServerLive(pb.ServerLiveRequest())
        trace_id = root.get_span_context().trace_id
    server_spans = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert server_spans and all(s.context.trace_id == trace_id for s in server_spans)
