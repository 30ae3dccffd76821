"""The global options every command shares (where the services are, the API key, JSON output) and the SDK
client built from them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import typer
from opentelemetry.sdk.trace import TracerProvider

from gristmill.cli.output import fail
from gristmill.client import ClientOptions, Endpoints, Gristmill
from gristmill.core.ports import HTTP_ENDPOINTS, OPENAI_ENDPOINT, SERVICE_PORTS
from gristmill.core.tls import TlsSettings, client_tls_from_environment


def parse_endpoints(text: str, base: Endpoints | None = None) -> Endpoints:
    """``labeling=127.0.0.1:50051 training=...`` (the embedded platform's READY line) → ``Endpoints``; a service
    may name several addresses, ``serving=h1:p,h2:p`` (its replicas, called round-robin); its HTTP servers (``openai=``,
    ``console=``: not gRPC services) are read by ``parse_http_address``."""
    endpoints = base or Endpoints()
    known = set(SERVICE_PORTS)
    changes: dict[str, str] = {}
    last = ""
    for part in text.replace(",", " ").split():
        if part == "READY" or part.partition("=")[0] in HTTP_ENDPOINTS:
            last = ""
            continue
        if "=" not in part and last and ":" in part:
            # ``serving=h1:p,h2:p``: another replica of the service named before (a round-robin channel).
            changes[last] += f",{part}"
            continue
        name, sep, address = part.partition("=")
        if not sep or name not in known or ":" not in address:
            raise ValueError(
                f"bad endpoint {part!r}: expected NAME=HOST:PORT with NAME one of {', '.join(sorted(known))}"
            )
        changes[name] = address
        last = name
    return replace(endpoints, **changes)


def parse_http_address(text: str, endpoint: str = OPENAI_ENDPOINT) -> str:
    """The ``<endpoint>=HOST:PORT`` (``openai``, ``console``) of the embedded platform's READY line ("" when it
    names none)."""
    for part in text.replace(",", " ").split():
        name, _, address = part.partition("=")
        if name == endpoint:
            return address
    return ""


def endpoints_for_host(host: str) -> Endpoints:
    """Every service on ``host`` at its default port."""
    return Endpoints(**{name: f"{host}:{port}" for name, port in SERVICE_PORTS.items()})


@dataclass
class CliState:
    """What the global options said; commands read it from ``ctx.obj``.

    ``tls``: the client certificate for mTLS, from ``GRISTMILL_TLS_*`` (None: plaintext); every channel the CLI
    opens (the SDK's, ``status``'s health checks) uses it."""

    endpoints: Endpoints = field(default_factory=Endpoints)
    api_key: str = ""
    as_json: bool = False
    timeout_s: float = 30.0
    tls: TlsSettings | None = field(default_factory=client_tls_from_environment)

    def client(self, tracer_provider: TracerProvider | None = None) -> Gristmill:
        options = ClientOptions(
            api_key=self.api_key, timeout_s=self.timeout_s, tls=self.tls, tracer_provider=tracer_provider
        )
        return Gristmill(self.endpoints, options)


def state(ctx: typer.Context) -> CliState:
    """The global options (a command run without the callback, e.g. in a unit test, gets the defaults)."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


def want_json(ctx: typer.Context, flag: bool) -> bool:
    """``--json`` given before the command (global) or after it (on the command)."""
    return flag or state(ctx).as_json


def build_state(
    *,
    host: str,
    endpoints: str,
    overrides: dict[str, str | None],
    api_key: str,
    as_json: bool,
    timeout_s: float,
) -> CliState:
    """Global options → ``CliState``: ``--host`` first, then ``--endpoints``, then one service's own option."""
    base = endpoints_for_host(host) if host else Endpoints()
    try:
        resolved = parse_endpoints(endpoints, base) if endpoints else base
    except ValueError as exc:
        fail(f"--endpoints: {exc}", code=2)
    resolved = replace(resolved, **{k: v for k, v in overrides.items() if v})
    return CliState(endpoints=resolved, api_key=api_key, as_json=as_json, timeout_s=timeout_s)
