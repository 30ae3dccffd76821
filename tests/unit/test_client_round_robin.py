"""The SDK's channel over several addresses (``host1:port,host2:port``): one channel, gRPC's round_robin policy,
calls spread across the replicas and carried on by the others when one stops. Two in-process servers on
127.0.0.1; the method is a generic one that answers with the server's name."""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from gristmill.cli.context import parse_endpoints
from gristmill.client.channel import ClientOptions, open_channel
from gristmill.core.addresses import round_robin_target, split_addresses
from gristmill.core.errors import UnavailableError

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


def test_a_channel_reaches_a_restarted_server_within_the_capped_backoff() -> None:
    """A server down for 12 s, then back on the same port: the channel's next connection attempt comes within
    ``grpc.max_reconnect_backoff_ms`` (2 s; gRPC's own backoff would have grown to ~6 s by then, and calls fail
    without trying until it elapses)."""
    server, address = _server("first")
    port = int(address.rsplit(":", 1)[1])
    options = ClientOptions(tls=None, max_attempts=1)
    with open_channel(address, options) as channel:
        assert _who(channel) == "first"
        server.stop(None)
        down_until = time.monotonic() + 12
        while time.monotonic() < down_until:  # callers keep calling while it is down, as a poll loop does
            with pytest.raises(UnavailableError):
                _who(channel)
            time.sleep(0.2)
        again = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        answer = grpc.unary_unary_rpc_method_handler(lambda _request, _context: b"again")
        again.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", {"Am": answer}),))
        assert again.add_insecure_port(f"127.0.0.1:{port}") == port
        again.start()
        try:
            back = time.monotonic()
            while True:
                try:
                    assert _who(channel) == "again"
                    break
                except UnavailableError:
                    assert time.monotonic() - back < 3.5, "the channel did not reconnect within 3.5 s"
                    time.sleep(0.1)
        finally:
            again.stop(None)
