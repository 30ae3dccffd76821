"""``Gristmill``: one object holding a typed stub per service."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gristmill.api.admin.v1 import admin_pb2_grpc
from gristmill.api.inference.v2 import grpc_predict_v2_pb2_grpc
from gristmill.api.labeling.v1 import labeling_pb2_grpc
from gristmill.api.registry.v1 import registry_pb2_grpc
from gristmill.api.serving.v1 import serving_pb2_grpc
from gristmill.api.training.v1 import training_pb2_grpc
from gristmill.client.channel import ClientOptions, open_channel
from gristmill.core.ports import default_address

SERVICES = ("labeling", "training", "registry", "serving", "admin")


@dataclass(frozen=True)
class Endpoints:
    """Where each service listens (the services' default ports on loopback)."""

    labeling: str = default_address("labeling")
    training: str = default_address("training")
    registry: str = default_address("registry")
    serving: str = default_address("serving")
    admin: str = default_address("admin")


class Gristmill:
    """Typed clients for every Gristmill API. Channels open lazily; use as a context manager or ``close()``.

    ``Gristmill(endpoints, options)``: where the services listen (``Endpoints()``: their default ports on
    127.0.0.1) and how to call them; the API key goes in the options, e.g.
    ``Gristmill(options=ClientOptions(api_key="gmk_..."))`` (a key's secret starts with ``gmk_``). Every write the
    SDK makes has a ``gristmill`` CLI command (``gristmill --help``).
    """

    def __init__(self, endpoints: Endpoints | None = None, options: ClientOptions | None = None) -> None:
        self.endpoints = endpoints or Endpoints()
        self.options = options or ClientOptions()
        self._channels: dict[str, grpc.Channel] = {}
        e = self.endpoints
        self.labeling = labeling_pb2_grpc.LabelingServiceStub(self._channel(e.labeling))
        self.training = training_pb2_grpc.TrainingServiceStub(self._channel(e.training))
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel(e.registry))
        self.serving = serving_pb2_grpc.ServingServiceStub(self._channel(e.serving))
        self.inference = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel(e.serving))
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel(e.admin))
        self.metering = admin_pb2_grpc.MeteringServiceStub(self._channel(e.admin))

    def license(self, service: str = "admin") -> admin_pb2_grpc.LicenseServiceStub:
        """``LicenseService`` of one service (each reports the licence it verified at start)."""
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; choose from {', '.join(SERVICES)}")
        return admin_pb2_grpc.LicenseServiceStub(self._channel(getattr(self.endpoints, service)))

    def _channel(self, target: str) -> grpc.Channel:
        # One channel per address: services that share a process share a connection.
        if target not in self._channels:
            # Named in error messages (a refused TLS handshake): "the labeling service at ...".
            service = "/".join(name for name in SERVICES if getattr(self.endpoints, name) == target)
            self._channels[target] = open_channel(target, self.options, service=service)
        return self._channels[target]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Gristmill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
