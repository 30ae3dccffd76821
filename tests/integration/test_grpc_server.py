"""The gRPC bootstrap on real ports: health, reflection, error mapping, metrics, tracing, auth, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from gristmill.core.errors import UnauthenticatedError
from gristmill.core.grpcserver import GrpcServer
from gristmill.core.metrics import ServiceMetrics
from tests.conftest import REPO_ROOT
from tests.support.sample_server import SERVICE, build_server

pytestmark = pytest.mark.integration


@pytest.fixture
async def server(tracing: tuple[object, object]) -> AsyncIterator[GrpcServer]:
    provider, _ = tracing
    async with build_server(metrics=ServiceMetrics("sample"), tracer_provider=provider) as srv:
        yield srv


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


async def test_health_reports_serving_for_server_and_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo(iter([request]))
        async for reply in call:
            return reply
        raise AssertionError("no reflection reply")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    described = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    assert described.file_descriptor_response.file_descriptor_proto, "reflection must serve the service's descriptor"


async def test_not_found_error_maps_to_not_found_with_its_message(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    for call in (
        stub.ModelReady(pb.ModelReadyRequest(name="ghost")),
        stub.ModelMetadata(pb.ModelMetadataRequest(name="ghost")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "model 'ghost' is not deployed"
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="known"))).ready is True


async def test_error_details_travel_as_trailing_metadata(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    call = stub.ModelReady(pb.ModelReadyRequest(name="ghost"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert ("gristmill-model", "ghost") in tuple(err.value.trailing_metadata() or ())


async def test_unexpected_error_is_internal_without_leaking_details(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ServerReady(pb.ServerReadyRequest())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (err.value.details() or "")
    assert "trace id" in (err.value.details() or "")


async def test_metrics_count_calls_by_method_and_code(server: GrpcServer, channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    await stub.ServerLive(pb.ServerLiveRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelReady(pb.ModelReadyRequest(name="ghost"))
    registry = server.metrics.registry
    labels = {"service": "sample", "method": f"/{SERVICE}/ServerLive", "code": "OK"}
    assert registry.get_sample_value("gristmill_rpc_requests_total", labels) == 1.0
    labels = {"service": "sample", "method": f"/{SERVICE}/ModelReady", "code": "NOT_FOUND"}
    # An error's status goes out when the error mapper aborts the call, and the metrics interceptor around it counts
    # the call just after: the client can see the error first (once in CI, the count was not there yet).
    deadline = time.monotonic() + 5
    while registry.get_sample_value("gristmill_rpc_requests_total", labels) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert registry.get_sample_value("gristmill_rpc_requests_total", labels) == 1.0


async def test_server_spans_are_recorded(channel: grpc.aio.Channel, tracing: tuple[object, object]) -> None:
    _, exporter = tracing
    await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
    spans = exporter.get_finished_spans()  # type: ignore[attr-defined]
    assert any(s.name == f"/{SERVICE}/ServerLive" for s in spans), [s.name for s in spans]


async def test_auth_hook_refuses_calls_but_not_health() -> None:
    def hook(method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        if ("x-api-key", "good") not in metadata:
            raise UnauthenticatedError("missing or unknown API key: send it as metadata 'x-api-key'")

    async with build_server(auth_hook=hook) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ServerLive(pb.ServerLiveRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.ServerLive(pb.ServerLiveRequest(), metadata=(("x-api-key", "good"),))).live
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_component_has_its_own_health_and_leaves_the_service_serving() -> None:
    """A stalled event consumer is NOT_SERVING under its own name while it lasts; the service stays SERVING."""
    healthy = {"gristmill.consumer.sample-group": True}
    async with (
        build_server(component_health=lambda: dict(healthy)) as srv,
        grpc.aio.insecure_channel(srv.address) as ch,
    ):
        stub = health_pb2_grpc.HealthStub(ch)

        async def status(name: str) -> int:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            return int(reply.status)

        async def becomes(name: str, expected: int) -> None:
            for _ in range(100):
                if await status(name) == expected:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{name} never became {expected}")

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("gristmill.consumer.sample-group") == serving
        healthy["gristmill.consumer.sample-group"] = False
        await becomes("gristmill.consumer.sample-group", not_serving)
        assert await status("") == serving and await status(SERVICE) == serving
        healthy["gristmill.consumer.sample-group"] = True
        await becomes("gristmill.consumer.sample-group", serving)


async def test_stop_is_idempotent_and_marks_not_serving() -> None:
    srv = build_server()
    await srv.start()
    await srv.stop(0)
    await srv.stop(0)
    assert srv._stopped.is_set()


def test_sigterm_drains_in_flight_calls_then_exits() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sample_server", "--port", "0", "--grace", "5"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                port = int(line.split()[1])
        assert port, "sample server did not start"

        async def scenario() -> tuple[bool, grpc.StatusCode | None]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                slow = asyncio.ensure_future(
                    stub.ServerLive(pb.ServerLiveRequest(), metadata=(("x-delay-ms", "1500"),))
                )
                await asyncio.sleep(0.4)  # the slow call is now in flight
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late_code = None
                try:
                    await stub.ServerLive(pb.ServerLiveRequest(), timeout=2)
                except grpc.aio.AioRpcError as exc:
                    late_code = exc.code()
                return (await slow).live, late_code

        live, late_code = asyncio.run(scenario())
        assert live is True, "the in-flight call must finish during the drain"
        assert late_code == grpc.StatusCode.UNAVAILABLE, "a call after SIGTERM must be refused"
        assert proc.wait(timeout=15) == 0
        rest = proc.stdout.read()
        assert "STOPPED" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
