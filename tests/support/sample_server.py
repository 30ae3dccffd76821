"""A sample service built with the gRPC bootstrap, used by the bootstrap's tests.

It implements a few Open Inference Protocol RPCs with behaviours the tests need: a slow call (to
prove draining on SIGTERM), a NotFoundError, an unexpected exception.
Run as a process: ``python -m tests.support.sample_server --port 0`` prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as pb
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from gristmill.core.errors import NotFoundError
from gristmill.core.grpcserver import AuthHook, GrpcServer, ServiceRegistration, serve_until_signal
from gristmill.core.metrics import ServiceMetrics

SERVICE = "inference.GRPCInferenceService"


class SampleServicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        # Blocking work, as domain code does, for as long as the caller asks (metadata "x-delay-ms").
        delay_ms = dict(context.invocation_metadata()).get("x-delay-ms", "0")
        await asyncio.to_thread(time.sleep, int(delay_ms) / 1000)
        return pb.ServerLiveResponse(live=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if request.name != "known":
            raise NotFoundError(f"model {request.name!r} is not deployed", details={"model": request.name})
        return pb.ModelReadyResponse(ready=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        raise RuntimeError("secret internal detail that must not reach the client")

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        await asyncio.sleep(0)
        if request.name != "known":
            raise NotFoundError(f"model {request.name!r} is not deployed")
        return pb.ModelMetadataResponse(name="known", platform="sample")


def build_server(
    *,
    port: int = 0,
    metrics: ServiceMetrics | None = None,
    tracer_provider: Any = None,
    auth_hook: AuthHook | None = None,
    grace_s: float = 5.0,
    server_credentials: grpc.ServerCredentials | None = None,
    component_health: Callable[[], Mapping[str, bool]] | None = None,
) -> GrpcServer:
    servicer = SampleServicer()
    registration = ServiceRegistration(
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        lambda server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server),
    )
    return GrpcServer(
        "sample",
        [registration],
        port=port,
        metrics=metrics,
        tracer_provider=tracer_provider,
        auth_hook=auth_hook,
        grace_s=grace_s,
        server_credentials=server_credentials,
        component_health=component_health,
        health_interval_s=0.05,
    )


async def _main(port: int, grace_s: float) -> None:
    server = build_server(port=port, grace_s=grace_s)

    async def announce() -> None:
        while server.port == 0:
            await asyncio.sleep(0.01)
        print(f"READY {server.port}", flush=True)

    task = asyncio.create_task(announce())
    await serve_until_signal(server)
    task.cancel()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_main(args.port, args.grace))


class ServerThread:
    """Runs a GrpcServer on its own event loop in a background thread (for tests of sync clients)."""

    def __init__(self, server: GrpcServer) -> None:
        import threading

        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> GrpcServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
