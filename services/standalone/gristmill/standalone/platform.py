"""Builds and runs the service hosts (the four services and admin) on one in-process bus."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gristmill.admin.app import build_app as build_admin
from gristmill.admin.settings import AdminSettings
from gristmill.console.app import ConsoleApp
from gristmill.console.app import build_app as build_console
from gristmill.console.settings import ConsoleSettings
from gristmill.core.auth import AuthSettings
from gristmill.core.events import MemoryBroker
from gristmill.core.host import Infrastructure, ServiceHost
from gristmill.core.licensing import License, load_license
from gristmill.core.ports import CONSOLE_ENDPOINT, CONSOLE_PORT, LABELING_PORT, OPENAI_ENDPOINT, service_ports
from gristmill.core.security import Security, embedded_security
from gristmill.core.service import HasHost
from gristmill.core.settings import ServiceSettings, TelemetrySettings
from gristmill.labeling.app import build_app as build_labeling
from gristmill.labeling.settings import LabelingSettings
from gristmill.registry.app import build_app as build_registry
from gristmill.registry.settings import RegistrySettings
from gristmill.serving.app import build_app as build_serving
from gristmill.serving.settings import ServingSettings
from gristmill.training.app import build_app as build_training
from gristmill.training.settings import TrainingSettings

log = logging.getLogger(__name__)
S = TypeVar("S", bound=ServiceSettings)

# Start order: admin and the registry first (labeling and serving need the registry's address), serving last
# (it loads from the registry). Admin answers `gristmill keys` / `usage`; auth is off in embedded mode (loopback only).
ORDER = ("admin", "registry", "labeling", "training", "serving")


@dataclass
class EmbeddedPlatform:
    """Every service in this process. ``base_port`` 0 gives every service a free port; ``None`` the defaults."""

    data_dir: Path
    base_port: int | None = None
    host: str = "127.0.0.1"
    ray_num_cpus: int = 2
    telemetry: TelemetrySettings | None = None
    # The community edition: the embedded platform reads no licence file.
    license: License = field(default_factory=lambda: load_license(None, ""))
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    hosts: dict[str, ServiceHost] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    console: ConsoleApp | None = None

    def _port(self, service: str) -> int:
        # The defaults, any free port (0), or base, base+1, ... in the order of the default ports.
        return service_ports(self.base_port)[service]

    def _settings(self, cls: type[S], service: str, **extra: Any) -> S:
        return cls(grpc_port=self._port(service), data_dir=self.data_dir, host=self.host, **extra)

    def _build(self, service: str) -> HasHost:
        # Explicitly empty: the in-process bus and local files, whatever the environment says.
        infra = Infrastructure(telemetry=self.telemetry, memory_broker=self.broker)
        if service == "admin":
            # Admin answers `gristmill keys` / `usage` with auth off; it bootstraps the root organisation (and
            # its first admin key, in the data dir) so that `gristmill keys` works.
            admin_security = Security(None, self.license, auth=AuthSettings(disabled=True))
            return build_admin(self._settings(AdminSettings, service), infra, admin_security)
        # The embedded dev mode: no API keys (each service logs that loudly), one licence for all of them.
        security = embedded_security(service, self.license)
        if service == "registry":
            # Embedded on the user's machine: base models import from its directories and GGUF files.
            registry = self._settings(RegistrySettings, service, allow_local_paths=True)
            return build_registry(registry, infra, security)
        if service == "labeling":
            labeling = self._settings(LabelingSettings, service, registry_address=self.addresses["registry"])
            return build_labeling(labeling, infra, security)
        if service == "training":
            training = self._settings(
                TrainingSettings, service, ray_num_cpus=self.ray_num_cpus, registry_address=self.addresses["registry"]
            )
            return build_training(training, infra, security)
        settings = self._settings(ServingSettings, service, registry_address=self.addresses["registry"])
        return build_serving(settings, infra, security)

    async def start(self) -> dict[str, str]:
        """Start every service in order; returns service → address (and ``openai`` → serving's OpenAI-compatible
        HTTP API). Stops what started if one fails."""
        try:
            for service in ORDER:
                app = self._build(service)
                host = app.host
                bound = await host.start()
                self.hosts[service] = host
                self.addresses[service] = f"{self.host}:{bound}"
                log.info("%s serving on %s", service, self.addresses[service])
                openai = getattr(app, "openai", None)
                if openai is not None:
                    # Serving's OpenAI-compatible HTTP API: its port is a free one when the gRPC port is.
                    self.addresses[OPENAI_ENDPOINT] = f"{self.host}:{openai.port}"
            await self._start_console()
        except BaseException:
            await self.stop()
            raise
        return dict(self.addresses)

    async def _start_console(self) -> None:
        """The console's web pages, last: they call every service (auth is off here, as in the services)."""
        base = self.base_port
        port = CONSOLE_PORT if base is None else 0 if base == 0 else base + (CONSOLE_PORT - LABELING_PORT)
        settings = ConsoleSettings(
            host=self.host,
            http_port=port,
            labeling_address=self.addresses["labeling"],
            admin_address=self.addresses["admin"],
            training_address=self.addresses["training"],
            registry_address=self.addresses["registry"],
            serving_address=self.addresses["serving"],
        )
        self.console = build_console(settings)
        await self.console.open()
        self.addresses[CONSOLE_ENDPOINT] = f"{self.host}:{self.console.port}"

    async def stop(self) -> None:
        """Stop in reverse order (each drains its in-flight calls). Safe to call twice."""
        console, self.console = self.console, None
        if console is not None:
            await console.close()
        for service in reversed(ORDER):
            host = self.hosts.pop(service, None)
            if host is not None:
                await host.stop()
