"""``run_service``: what every service's ``python -m`` does, in one place.

settings (the service's own; Kafka, S3 and telemetry as an ``Infrastructure``) → logging → the service's own
process set-up → security (API keys, licence, mTLS) → the service's ``build_app(settings, infra, security)`` →
its ``host`` serves until SIGTERM/SIGINT → close security.
A ``ConfigurationError`` at any step ends the process with one line on stderr, ``<service>: <message>``, and
exit status 2; nothing is left open.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Protocol, TypeVar

from gristmill.core.errors import ConfigurationError
from gristmill.core.host import Infrastructure, ServiceHost
from gristmill.core.logs import setup_logging
from gristmill.core.security import Security, load_security
from gristmill.core.settings import ServiceSettings, load_settings

S = TypeVar("S", bound=ServiceSettings)
S_contra = TypeVar("S_contra", bound=ServiceSettings, contravariant=True)

# The exit status of a process that cannot start as configured (sysexits' EX_USAGE is 64; 2 is what the
# services, their tests and the deploy scripts have always used).
CONFIGURATION_EXIT_STATUS = 2


class HasHost(Protocol):
    """What a service's ``build_app`` returns: its app, whose ``host`` runs it."""

    @property
    def host(self) -> ServiceHost: ...


class BuildApp(Protocol[S_contra]):
    """A service's ``build_app``: its app on ``infra``, with ``security``'s API keys, licence and mTLS."""

    def __call__(self, settings: S_contra, infra: Infrastructure, security: Security, /) -> HasHost: ...


def run_service(
    name: str,
    settings_cls: type[S],
    build: BuildApp[S],
    *,
    method_scopes: Mapping[str, str],
    public: Collection[str] = (),
    local_keys: bool = False,
    prepare: Callable[[S], object] | None = None,
) -> int:
    """Run service ``name`` until SIGTERM/SIGINT; returns the exit status (0, or 2 for a configuration error).

    ``method_scopes``, ``public`` and ``local_keys`` go to ``load_security``; ``prepare`` is the service's own
    process set-up, run once logging is set up and before security and the host are built (threads of a
    numeric library, for example).
    """
    security: Security | None = None
    try:
        settings = load_settings(settings_cls)
        infra = Infrastructure.from_environment()
        setup_logging(name, settings.log_level)
        if prepare is not None:
            prepare(settings)
        security = load_security(name, method_scopes, embedded=infra.embedded, public=public, local_keys=local_keys)
        host = build(settings, infra, security).host
        asyncio.run(host.run_until_signal())
    except ConfigurationError as exc:
        print(f"{name}: {exc}", file=sys.stderr, flush=True)
        return CONFIGURATION_EXIT_STATUS
    finally:
        if security is not None:
            security.close()
    return 0
