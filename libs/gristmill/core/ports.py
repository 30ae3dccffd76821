"""The one table of default ports: each service's gRPC port and the local stack's components.

Service settings default to these, the embedded platform and the CLI number services from them, the SDK's
``Endpoints`` point at them; ``deploy/`` scripts and manifests repeat them (shell and YAML cannot import this).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

LABELING_PORT = 50051
TRAINING_PORT = 50052
REGISTRY_PORT = 50053
SERVING_PORT = 50054
ADMIN_PORT = 50055

# In this order: ``--base-port N`` gives labeling N, training N+1, and so on.
SERVICE_PORTS: Mapping[str, int] = MappingProxyType(
    {
        "labeling": LABELING_PORT,
        "training": TRAINING_PORT,
        "registry": REGISTRY_PORT,
        "serving": SERVING_PORT,
        "admin": ADMIN_PORT,
    }
)

# Serving's OpenAI-compatible HTTP API listens this far above serving's gRPC port (50056 by default): the port
# after the services' block of five whatever the base port, and a serving replica's moves with its gRPC port.
OPENAI_HTTP_PORT_OFFSET = 2
SERVING_OPENAI_PORT = SERVING_PORT + OPENAI_HTTP_PORT_OFFSET
# The name of serving's OpenAI-compatible HTTP API in the embedded platform's READY line (beside the services).
OPENAI_ENDPOINT = "openai"

# The console's web pages (services/console): the port after serving's OpenAI-compatible API, outside the services'
# block of five and the serving replicas' steps of 100.
CONSOLE_PORT = LABELING_PORT + 6
# The name of the console in the embedded platform's READY line.
CONSOLE_ENDPOINT = "console"
# The READY line's names that are HTTP servers, not gRPC services.
HTTP_ENDPOINTS = (OPENAI_ENDPOINT, CONSOLE_ENDPOINT)

# The local stack (deploy/local/stack.sh): its defaults, each overridden there by GRISTMILL_<NAME>_PORT.
KAFKA_PORT = 9092
S3_PORT = 8333
POSTGRES_PORT = 5433

LOOPBACK = "127.0.0.1"


def service_ports(base_port: int | None = None) -> dict[str, int]:
    """Each service's port: the defaults (``base_port`` None), any free port (0), or ``base_port``,
    ``base_port + 1``, ... in the order of ``SERVICE_PORTS``."""
    if base_port is None:
        return dict(SERVICE_PORTS)
    if base_port == 0:
        return dict.fromkeys(SERVICE_PORTS, 0)
    return {name: base_port + i for i, name in enumerate(SERVICE_PORTS)}


# Serving replica k (k >= 1, ``gristmill up --serving-replicas``) listens at the serving port + k x this: the
# services' ports are one block of five, so a step of 100 never lands on one of them, whatever the base port.
SERVING_REPLICA_PORT_STEP = 100
MAX_SERVING_REPLICAS = 9


def serving_replica_port(serving_port: int, replica: int) -> int:
    """The port of serving replica ``replica`` (0: the first serving process itself, at ``serving_port``)."""
    if not 0 <= replica <= MAX_SERVING_REPLICAS:
        raise ValueError(f"serving replica {replica}: choose 0 to {MAX_SERVING_REPLICAS}")
    return serving_port + replica * SERVING_REPLICA_PORT_STEP


def default_address(service: str, host: str = LOOPBACK) -> str:
    """``host:port`` of ``service`` at its default port."""
    return f"{host}:{SERVICE_PORTS[service]}"
