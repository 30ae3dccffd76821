#!/usr/bin/env python3
"""Container health check: ask a gRPC server for its grpc.health.v1 status, grpc_health_probe style.

    grpc-health-probe [-addr HOST:PORT] [-service NAME] [-timeout SECONDS]

Exit 0 when the server answers SERVING, 1 otherwise (one line on stderr says why). The address defaults
to 127.0.0.1:$GRISTMILL_GRPC_PORT, which the image sets for its service. Needs only grpcio and
grpcio-health-checking, which every Gristmill service installs.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(prog="grpc-health-probe")
    parser.add_argument("-addr", default=f"127.0.0.1:{os.environ.get('GRISTMILL_GRPC_PORT', '50051')}")
    parser.add_argument("-service", default="", help="service name; empty asks about the whole server")
    parser.add_argument("-timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args()

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"unhealthy: {args.addr}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.addr} answers {status}", file=sys.stderr)
        return 1
    print(f"{args.addr}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
