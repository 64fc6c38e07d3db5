"""gatewayd.listen: binding listening sockets, and when two addresses are one socket."""

from __future__ import annotations

import socket

import pytest
import trio

from gatewayd.config import Address
from gatewayd.listen import address_key, bind_address

BOUND = 10.0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (Address("127.0.0.1", 8443), "127.0.0.1:8443"),
        (Address("localhost", 8443), "127.0.0.1:8443"),  # the name resolves to the same socket
        (Address("0.0.0.0", 443), "0.0.0.0:443"),
        (Address("no-such-host.invalid", 443), "no-such-host.invalid:443"),  # unresolvable: as written
    ],
    ids=["ip", "name", "any", "unresolvable"],
)
def test_address_key(address: Address, key: str) -> None:
    assert address_key(address) == key


def test_address_key_ipv6_is_bracketed() -> None:
    assert address_key(Address("::1", 8443)) == "[::1]:8443"


async def test_bind_address_listens() -> None:
    with trio.fail_after(BOUND):
        sock = await bind_address(Address("127.0.0.1", 0))
        try:
            port = sock.getsockname()[1]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            client = await trio.open_tcp_stream("127.0.0.1", port)
            accepted, _ = await sock.accept()
            accepted.close()
            await client.aclose()
        finally:
            sock.close()


async def test_bind_address_names_a_busy_address() -> None:
    with trio.fail_after(BOUND):
        first = await bind_address(Address("127.0.0.1", 0))
        try:
            port = first.getsockname()[1]
            with pytest.raises(OSError) as caught:
                await bind_address(Address("127.0.0.1", port))
            assert caught.value.strerror == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        finally:
            first.close()


async def test_bind_address_names_an_unresolvable_address() -> None:
    with trio.fail_after(BOUND), pytest.raises(OSError, match="^cannot resolve listener address no-such-host.invalid:1: "):
        await bind_address(Address("no-such-host.invalid", 1))


async def test_bind_address_ipv6_is_v6_only() -> None:
    with trio.fail_after(BOUND):
        sock = await bind_address(Address("::1", 0))
        try:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        finally:
            sock.close()
