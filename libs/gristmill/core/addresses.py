"""Service addresses: one ``host:port``, or the replicas of one service, ``host1:port,host2:port``.

Every gRPC channel Gristmill opens (the SDK's, and the services' own calls to the registry and the admin) takes
either. Several addresses make one channel with gRPC's ``round_robin`` policy over all of them: calls spread across
the replicas that are up, and a replica that stops answering is left out until it is back.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any


def split_addresses(target: str) -> list[str]:
    """``host1:port,host2:port`` → its addresses (a single address → a list of one)."""
    return [part.strip() for part in target.split(",") if part.strip()]


def _host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected HOST:PORT")
    return host.strip("[]"), port


def round_robin_target(addresses: list[str]) -> str:
    """One gRPC target naming every address: ``ipv4:h1:p1,h2:p2`` (or ``ipv6:[h1]:p1,...``). A host name is
    resolved here, once, to all its addresses (gRPC's ``ipv4:``/``ipv6:`` schemes take literals only); IPv4 is
    preferred when the addresses have both."""
    v4: list[str] = []
    v6: list[str] = []
    for address in addresses:
        host, port = _host_port(address)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            ips = [ipaddress.ip_address(info[4][0]) for info in infos]
        for ip in ips:
            if ip.version == 4:
                v4.append(f"{ip}:{port}")
            else:
                v6.append(f"[{ip}]:{port}")
    if v4:
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    return "ipv6:" + ",".join(dict.fromkeys(v6))


# How long a channel whose peer is down waits between connection attempts: gRPC's default backoff grows by 1.6x
# from 1 s up to 120 s, and calls made meanwhile fail UNAVAILABLE without trying, so a caller of a service that was
# down for ~10 s (a restart) kept failing for ~16 s after the service was back (the e2e chat demo, waiting on a
# restarted serving). Capped at 2 s: a service back is reached within ~2 s; a down peer costs one connection
# attempt every 2 s per channel.
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def channel_target(target: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and channel options for ``target``: itself for one address; for several, one target over
    all of them with ``round_robin``, the first address's host as the name TLS checks (every replica's certificate
    must name it) and as the ``:authority`` sent. Either way the options bound the reconnection backoff."""
    addresses = split_addresses(target)
    if len(addresses) <= 1:
        return target, list(RECONNECT_OPTIONS)
    return round_robin_target(addresses), [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.default_authority", addresses[0]),
        *RECONNECT_OPTIONS,
    ]
