"""The data plane itself (gatewayd/dataplane.py), on real sockets: one epoll set, no task per tunnel.

The plane is driven directly here (socket pairs for the client and the
backend, so every end reason and timer can be provoked exactly), and through
the real server task (a spliced and a bridged connection are in the plane,
their tasks are gone, and they leave it with their access-log ends).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from gatewayd import splice
from gatewayd.dataplane import DataPlane, Handover, Tunnel, missing_trio_names
from gatewayd.record import End
from gatewayd.splice import SpliceStats

pytestmark = pytest.mark.timeout(30)


@dataclass
class Pair:
    """A tunnel in a running plane, and the test's ends of its two sockets."""

    plane: DataPlane
    tunnel: Tunnel
    client: trio.socket.SocketType
    backend: trio.socket.SocketType
    stats: SpliceStats
    ended: list[End | None] = field(default_factory=list)

    async def wait_end(self, limit: float = 5.0) -> End | None:
        with trio.fail_after(limit):
            while not self.ended:
                await trio.sleep(0.01)
        return self.ended[0]


def _pair() -> tuple[socket.socket, trio.socket.SocketType]:
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    return mine, trio.socket.from_stdlib_socket(theirs)


@asynccontextmanager
async def plane_tunnel(
    *, idle: float = 0.0, half_close: float = 0.0, client_data: bytes = b"", ending: str | None = None
) -> AsyncIterator[Pair]:
    plane = DataPlane()
    async with trio.open_nursery() as nursery:
        await nursery.start(plane.run)
        client_mine, client_theirs = _pair()
        backend_mine, backend_theirs = _pair()
        stats = SpliceStats()
        ended: list[End | None] = []
        tunnel = plane.splice(
            Handover(client_mine, None, client_data, ending),
            Handover(backend_mine),
            stats,
            idle_timeout=idle,
            half_close_timeout=half_close,
            on_end=ended.append,
        )
        try:
            yield Pair(plane, tunnel, client_theirs, backend_theirs, stats, ended)
        finally:
            client_theirs.close()
            backend_theirs.close()
            nursery.cancel_scope.cancel()


async def recv_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < size:
            chunk = await sock.recv(65536)
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return data


async def recv_eof(sock: trio.socket.SocketType) -> None:
    with trio.fail_after(5):
        assert await sock.recv(65536) == b""


async def test_bytes_flow_both_ways_and_half_closes_pass_on() -> None:
    async with plane_tunnel() as pair:
        await pair.client.send(b"hello")
        assert await recv_exactly(pair.backend, 5) == b"hello"
        await pair.backend.send(b"world!")
        assert await recv_exactly(pair.client, 6) == b"world!"
        pair.client.shutdown(socket.SHUT_WR)
        await recv_eof(pair.backend)
        # The other direction keeps flowing after the half-close.
        await pair.backend.send(b"late")
        assert await recv_exactly(pair.client, 4) == b"late"
        pair.backend.shutdown(socket.SHUT_WR)
        await recv_eof(pair.client)
        assert await pair.wait_end() is End.CLIENT_CLOSE
        assert (pair.stats.bytes_up, pair.stats.bytes_down, pair.stats.error) == (5, 10, "")
        assert len(pair.plane) == 0


@pytest.mark.parametrize(
    ("first", "end"),
    [("client", End.CLIENT_CLOSE), ("backend", End.BACKEND_CLOSE)],
)
async def test_the_end_is_named_after_who_closed_first(first: str, end: End) -> None:
    async with plane_tunnel() as pair:
        one, other = (pair.client, pair.backend) if first == "client" else (pair.backend, pair.client)
        one.shutdown(socket.SHUT_WR)
        await recv_eof(other)
        other.shutdown(socket.SHUT_WR)
        await recv_eof(one)
        assert await pair.wait_end() is end


@pytest.mark.parametrize(("side", "end"), [("client", End.CLIENT_ERROR), ("backend", End.BACKEND_ERROR)])
async def test_a_reset_ends_the_tunnel_as_that_sides_error(side: str, end: End) -> None:
    async with plane_tunnel() as pair:
        sock = pair.client if side == "client" else pair.backend
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await (pair.backend if side == "client" else pair.client).send(b"unread")
        await trio.sleep(0.05)
        sock.close()
        assert await pair.wait_end() is end
        assert pair.stats.error.startswith(f"{side}: ConnectionResetError"), pair.stats.error


async def test_data_handed_over_goes_first_then_its_end() -> None:
    async with plane_tunnel(client_data=b"came with the head", ending="eof") as pair:
        assert await recv_exactly(pair.backend, 18) == b"came with the head"
        await recv_eof(pair.backend)
        pair.backend.shutdown(socket.SHUT_WR)
        assert await pair.wait_end() is End.CLIENT_CLOSE
        assert pair.stats.bytes_up == 18


async def test_a_failure_handed_over_ends_the_tunnel_after_the_data() -> None:
    async with plane_tunnel(client_data=b"x", ending="TLSError: decryption failed") as pair:
        assert await recv_exactly(pair.backend, 1) == b"x"
        assert await pair.wait_end() is End.CLIENT_ERROR
        assert pair.stats.error == "client: TLSError: decryption failed"


async def test_idle_timeout_ends_a_quiet_tunnel_and_traffic_keeps_it_open() -> None:
    async with plane_tunnel(idle=0.4) as pair:
        for _ in range(4):
            await trio.sleep(0.2)
            await pair.client.send(b".")
            await recv_exactly(pair.backend, 1)
        assert not pair.ended
        assert await pair.wait_end() is End.IDLE_TIMEOUT


async def test_half_close_timeout_bounds_the_other_direction() -> None:
    async with plane_tunnel(half_close=0.3) as pair:
        pair.backend.shutdown(socket.SHUT_WR)
        await recv_eof(pair.client)
        assert await pair.wait_end() is End.HALF_CLOSE_TIMEOUT


async def test_close_at_ends_it_for_the_gateway() -> None:
    async with plane_tunnel() as pair:
        pair.tunnel.close_at(trio.current_time() + 0.2)
        assert await pair.wait_end() is None
        assert pair.stats.end is None  # the connection names it (shutdown or max_age)


async def test_cancelling_the_plane_ends_every_tunnel_as_shutdown() -> None:
    ended: list[End | None] = []
    async with plane_tunnel() as pair:
        ended = pair.ended
        await pair.client.send(b"x")
        await recv_exactly(pair.backend, 1)
    assert ended == [End.SHUTDOWN]


def fill(sock: trio.socket.SocketType) -> int:
    """Write into ``sock`` until the kernel takes no more; the count."""
    total = 0
    block = b"z" * 65536
    while True:
        try:
            total += os.write(sock.fileno(), block)
        except BlockingIOError:
            return total


async def test_a_stalled_destination_pauses_its_source_without_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "STALL_TIMEOUT", 60.0)
    async with plane_tunnel() as pair:
        # Neither test end reads: both directions fill up and stall.
        for _ in range(20):
            fill(pair.client)
            fill(pair.backend)
            await trio.sleep(0.05)
        tunnel = pair.tunnel
        assert tunnel.up.pending is not None and tunnel.down.pending is not None
        # Each end is registered for writing only: the sources are not read
        # (and not registered for reading) while their destinations are full.
        assert (tunnel.client.mask, tunnel.backend.mask) == (select.EPOLLOUT, select.EPOLLOUT)
        start = time.process_time()
        await trio.sleep(1.0)
        used = time.process_time() - start
        assert used < 0.1, f"{used:.3f}s of CPU in 1s while both directions were stalled"
        assert not pair.ended


async def test_a_stalled_destination_ends_the_tunnel_after_the_stall_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splice, "STALL_TIMEOUT", 0.5)
    async with plane_tunnel() as pair:
        for _ in range(20):
            fill(pair.client)
            await trio.sleep(0.02)
        assert await pair.wait_end() is End.BACKEND_ERROR
        assert pair.stats.error == "backend: TimeoutError: backend read nothing for 0.5s"


async def test_many_tunnels_many_timers() -> None:
    """Hundreds of tunnels ending in every order: the heap keeps up and forgets them."""
    plane = DataPlane()
    ended: list[End | None] = []
    peers: list[trio.socket.SocketType] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(plane.run)
        for index in range(200):
            client_mine, client_theirs = _pair()
            backend_mine, backend_theirs = _pair()
            peers += [client_theirs, backend_theirs]
            tunnel = plane.splice(
                Handover(client_mine),
                Handover(backend_mine),
                SpliceStats(),
                idle_timeout=0.3 + (index % 7) / 10,
                half_close_timeout=0,
                on_end=ended.append,
            )
            if index % 3 == 0:
                tunnel.close_at(trio.current_time() + 0.1)
        with trio.fail_after(10):
            while len(ended) < 200:
                await trio.sleep(0.05)
        assert len(plane) == 0
        assert sorted({str(end) for end in ended}) == ["None", "idle_timeout"]
        nursery.cancel_scope.cancel()
    for peer in peers:
        peer.close()



# ---------------------------------------------------------------- through the server


async def test_a_wss_backend_tunnel_is_in_the_plane_and_carries_every_size(tmp_path: Path) -> None:
    """The standard library's TLS to a wss:// backend goes on in the plane (MemoryTLS):
    records beyond a read stay in its BIO (the ready list), ciphertext the socket
    did not take goes out when it can."""
    from trio_websocket import open_websocket_url

    from test_e2e_backends import wss_environment

    async with wss_environment(tmp_path) as env:
        plane = env.gw.gateway.dataplane
        async with open_websocket_url(f"ws://localhost:{env.gw.port}/good") as ws:
            with trio.fail_after(20):
                while len(plane) != 1:
                    await trio.sleep(0.01)
                for size in (1, 100, 16383, 16384, 16385, 65536, 300_000, 1 << 20):
                    payload = os.urandom(size)
                    await ws.send_message(payload)
                    assert await ws.get_message() == payload
                # Many small messages in flight at once: several records per read.
                payloads = [os.urandom(50 + index) for index in range(200)]
                for payload in payloads:
                    await ws.send_message(payload)
                for payload in payloads:
                    assert await ws.get_message() == payload
        with trio.fail_after(5):
            while len(plane):
                await trio.sleep(0.01)


async def test_the_private_trio_names_the_wss_handover_uses_exist() -> None:
    """A trio upgrade that renames them fails here, not on a client's connection
    (the tunnel would then stay in its task: dataplane.can_take says no)."""
    left, right = trio.testing.memory_stream_pair()
    context = ssl.create_default_context()
    stream = trio.SSLStream(left, context, server_hostname="localhost")
    assert missing_trio_names(stream) == []
    await right.aclose()
