#!/usr/bin/env python3
"""Container health check: ask a gRPC server for its grpc.health.v1 status, grpc_health_probe style.

    grpc-health-probe [-addr HOST:PORT] [-service NAME] [-timeout SECONDS]

Exit 0 when the server answers SERVING, 1 otherwise (one line on stderr says why). The address defaults
to 127.0.0.1:$GRISTMILL_GRPC_PORT, which the image sets for its service. With GRISTMILL_TLS_CERT_FILE /
_KEY_FILE / _CA_FILE set (the service's own mTLS settings, docker-compose.tls.yml) it calls over mTLS with that
certificate. Needs only grpcio and grpcio-health-checking, which every Gristmill service installs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="grpc-health-probe")
    parser.add_argument("-addr", default=f"127.0.0.1:{os.environ.get('GRISTMILL_GRPC_PORT', '50051')}")
    parser.add_argument("-service", default="", help="service name; empty asks about the whole server")
    parser.add_argument("-timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args()

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = [os.environ.get(f"GRISTMILL_TLS_{name}_FILE", "") for name in ("CA", "KEY", "CERT")]
    try:
        if tls[2]:
            ca, key, cert = (Path(path).read_bytes() for path in tls)
            channel = grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(ca, key, cert))
        else:
            channel = grpc.insecure_channel(args.addr)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"unhealthy: {args.addr}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"unhealthy: {args.addr}: cannot read the TLS files: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.addr} answers {status}", file=sys.stderr)
        return 1
    print(f"{args.addr}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
