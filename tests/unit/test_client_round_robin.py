"""The SDK's channel over several addresses (``host1:port,host2:port``): one channel, gRPC's round_robin policy,
calls spread across the replicas and carried on by the others when one stops. Two in-process servers on
127.0.0.1; the method is a generic one that answers with the server's name."""

from __future__ import annotations

import collections
import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from gristmill.cli.context import parse_endpoints
from gristmill.client.channel import ClientOptions, open_channel
from gristmill.core.addresses import round_robin_target, split_addresses

METHOD = "/test.Who/Am"


def _server(name: str) -> tuple[grpc.Server, str]:
    def answer(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return name.encode()

    handler = grpc.method_handlers_generic_handler("test.Who", {"Am": grpc.unary_unary_rpc_method_handler(answer)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def two_servers() -> Iterator[tuple[list[grpc.Server], list[str]]]:
    made = [_server("a"), _server("b")]
    yield [s for s, _ in made], [a for _, a in made]
    for server, _ in made:
        server.stop(None)


def _who(channel: grpc.Channel) -> str:
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    return bytes(call(b"", timeout=5)).decode()


def test_one_channel_over_two_addresses_spreads_calls_and_survives_one_server_stopping(
    two_servers: tuple[list[grpc.Server], list[str]],
) -> None:
    servers, addresses = two_servers
    options = ClientOptions(tls=None, backoff_s=0.05)
    with open_channel(",".join(addresses), options) as channel:
        seen = collections.Counter(_who(channel) for _ in range(40))
        # round_robin: every ready replica in turn (both connect before the first pick, or within a few calls).
        assert seen["a"] >= 10 and seen["b"] >= 10, seen
        servers[0].stop(None)
        after = collections.Counter(_who(channel) for _ in range(20))
        assert after == {"b": 20}


def test_a_single_address_is_the_plain_target(two_servers: tuple[list[grpc.Server], list[str]]) -> None:
    _, addresses = two_servers
    with open_channel(addresses[1], ClientOptions(tls=None)) as channel:
        assert {_who(channel) for _ in range(5)} == {"b"}


def test_round_robin_targets_name_every_address() -> None:
    assert split_addresses("10.0.0.1:1, 10.0.0.2:2") == ["10.0.0.1:1", "10.0.0.2:2"]
    assert split_addresses("h:1") == ["h:1"]
    assert round_robin_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert round_robin_target(["[::1]:5", "[fe80::2]:6"]) == "ipv6:[::1]:5,[fe80::2]:6"
    # A host name is resolved (here localhost, to 127.0.0.1 where the machine has IPv4 loopback).
    if "127.0.0.1" in {info[4][0] for info in socket.getaddrinfo("localhost", 1)}:
        assert round_robin_target(["localhost:7", "10.0.0.2:8"]).startswith("ipv4:127.0.0.1:7,")
    with pytest.raises(ValueError, match="HOST:PORT"):
        round_robin_target(["nohost", "10.0.0.2:8"])


def test_the_cli_endpoints_take_several_addresses_per_service() -> None:
    endpoints = parse_endpoints("labeling=10.0.0.1:1,10.0.0.2:1 serving=10.0.0.1:4,10.0.0.2:4 admin=10.0.0.3:5")
    assert endpoints.labeling == "10.0.0.1:1,10.0.0.2:1"
    assert endpoints.serving == "10.0.0.1:4,10.0.0.2:4"
    assert endpoints.admin == "10.0.0.3:5"
    with pytest.raises(ValueError, match="expected NAME=HOST:PORT"):
        parse_endpoints("10.0.0.2:1 serving=10.0.0.1:4")


def test_the_services_own_channels_spread_over_replicas_too(two_servers: tuple[list[grpc.Server], list[str]]) -> None:
    """A service's calls to another (serving to the registry, every service to the admin) go through
    ``ReloadingChannel``: a replica list there is one round-robin channel as well."""
    from gristmill.core.tls import ReloadingChannel

    servers, addresses = two_servers
    reloading = ReloadingChannel(",".join(addresses))
    try:
        with reloading.use() as channel:
            seen = collections.Counter(_who(channel) for _ in range(40))
        assert seen["a"] >= 10 and seen["b"] >= 10, seen
        servers[1].stop(None)
        answers, failures = collections.Counter(), 0
        with reloading.use() as channel:
            for _ in range(20):
                try:
                    answers[_who(channel)] += 1
                except grpc.RpcError:
                    failures += 1  # a call picked the stopped replica as it went (no retry in this channel)
        assert answers["a"] >= 19 and failures <= 1 and "b" not in answers, (answers, failures)
    finally:
        reloading.close()
