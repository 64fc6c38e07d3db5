"""The in-task bridge (gatewayd.bridge.Bridge) on its own: no gateway, no data plane.

In production every bridged connection is served by the data plane; this
driver of the same engine serves tunnels whose streams are not sockets. So
it is run directly here, over two transports (``sockets``: TCP socket pairs
on loopback; ``memory``: trio memory streams, the fallback's real case),
with a representative set of ``tests/test_bridge.py``'s scenarios: data both
ways under backpressure, messages to bytes, ping, early bytes, both closing
orders, each class of violation, a backend error, and every timer
(going away, ``idle_timeout``, the closing handshake's bound,
``half_close_timeout``). The test holds the WebSocket client's end and the
service's end of the two streams.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from trio.testing import MockClock
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from gatewayd import wsbridge
from gatewayd.bridge import Bridge
from gatewayd.record import End
from gatewayd.splice import SpliceStats
from test_bridge import WS

pytestmark = pytest.mark.timeout(30)

MAX_MESSAGE = 100_000
TRANSPORTS = ["sockets", "memory"]


def stream_pair(transport: str) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """Two connected streams: (the test's end, the bridge's end)."""
    if transport == "memory":
        return trio.testing.memory_stream_pair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
        trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
    )


@dataclass
class Bridged:
    """A running Bridge, the test's WebSocket client and the test's end of the service stream."""

    transport: str
    bridge: Bridge
    client: WS
    service: trio.abc.HalfCloseableStream
    stats: SpliceStats
    done: trio.Event

    async def wait_done(self) -> SpliceStats:
        """The bridge's run() returned (and its streams were closed, as the connection does)."""
        with trio.fail_after(20):
            await self.done.wait()
        return self.stats

    async def service_reads(self) -> tuple[bytes, str]:
        """Everything the service receives, and how its stream ended: "eof" or "reset"."""
        data = bytearray()
        with trio.fail_after(20):
            while True:
                try:
                    chunk = await self.service.receive_some(65536)
                except trio.BrokenResourceError:
                    return bytes(data), "reset"
                if not chunk:
                    return bytes(data), "eof"
                data += chunk

    async def service_gets(self, size: int) -> bytes:
        data = bytearray()
        with trio.fail_after(20):
            while len(data) < size:
                chunk = await self.service.receive_some(65536)
                assert chunk, "the service's stream ended"
                data += chunk
        return bytes(data)

    async def break_service(self) -> None:
        """The service fails: a TCP reset (sockets), a stream that takes nothing more (memory)."""
        if isinstance(self.service, trio.SocketStream):
            self.service.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.service.socket.close()
        else:
            assert isinstance(self.service, trio.StapledStream)
            await self.service.receive_stream.aclose()


@asynccontextmanager
async def bridged(
    transport: str,
    *,
    early: bytes = b"",
    max_message_size: int = MAX_MESSAGE,
    idle_timeout: float = 0.0,
    half_close_timeout: float = 0.0,
) -> AsyncIterator[Bridged]:
    client, client_side = stream_pair(transport)
    service, service_side = stream_pair(transport)
    stats = SpliceStats()
    bridge = Bridge(
        client_side,
        service_side,
        stats,
        max_message_size=max_message_size,
        idle_timeout=idle_timeout,
        half_close_timeout=half_close_timeout,
    )
    done = trio.Event()

    async def run() -> None:
        try:
            await bridge.run(early)
        finally:
            # As the connection does once the tunnel is over.
            await trio.aclose_forcefully(client_side)
            await trio.aclose_forcefully(service_side)
            done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                yield Bridged(transport, bridge, WS(client, b"", b""), service, stats, done)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # Outside the cancelled nursery: a failure of the test is not masked by Cancelled.
        await trio.aclose_forcefully(client)
        if not isinstance(service, trio.SocketStream) or service.socket.fileno() >= 0:
            await trio.aclose_forcefully(service)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def masked(first: int, payload: bytes) -> bytes:
    """One client frame (mask 0, so the payload is sent as is), ``first`` = FIN|opcode."""
    assert len(payload) < 126
    return bytes([first, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


# ------------------------------------------------------------------ data


async def test_2_mib_each_way_through_an_echo_service(transport: str) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    async with bridged(transport, max_message_size=1 << 20) as b:

        async def echo() -> None:
            while data := await b.service.receive_some(65536):
                await b.service.send_all(data)
            await b.service.send_eof()

        async def sender() -> None:
            for offset in range(0, len(payload), 256 * 1024):
                await b.client.send(BytesMessage(data=payload[offset : offset + 256 * 1024]))

        received = hashlib.sha256()
        count = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(sender)
            with trio.fail_after(20):
                while count < len(payload):
                    event = await b.client.event()
                    assert isinstance(event, BytesMessage)
                    received.update(event.data)
                    count += len(event.data)
            await b.client.send(CloseConnection(code=1000))
            assert await b.client.event() == CloseConnection(code=1000, reason="")
        stats = await b.wait_done()
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert stats.end is End.CLIENT_CLOSE
    assert stats.bytes_up > len(payload) and stats.bytes_down > len(payload)


async def test_text_and_binary_and_fragmented_messages_become_bytes_in_order(transport: str) -> None:
    async with bridged(transport) as b:
        await b.client.send(
            TextMessage(data="héllo ", message_finished=True),
            BytesMessage(data=b"\x00\x01", message_finished=False),
            BytesMessage(data=b"\x02", message_finished=False),
            BytesMessage(data=b"\x03|", message_finished=True),
            TextMessage(data="frag", message_finished=False),
            TextMessage(data="ment€d", message_finished=True),
        )
        expected = "héllo ".encode() + b"\x00\x01\x02\x03|" + "fragment€d".encode()
        assert await b.service_gets(len(expected)) == expected


async def test_each_service_read_becomes_one_binary_message(transport: str) -> None:
    async with bridged(transport) as b:
        await b.service.send_all(b"RFB 003.008\n")
        assert await b.client.event() == BytesMessage(data=b"RFB 003.008\n")


async def test_ping_is_answered_with_its_payload(transport: str) -> None:
    async with bridged(transport) as b:
        await b.client.send(Ping(payload=b"are you there"))
        assert await b.client.event() == Pong(payload=b"are you there")


async def test_early_bytes_reach_the_service_first_and_are_not_counted(transport: str) -> None:
    early = Connection(ConnectionType.CLIENT).send(BytesMessage(data=b"EARLY"))
    async with bridged(transport, early=early) as b:
        assert await b.service_gets(5) == b"EARLY"
        await b.client.send(CloseConnection(code=1000))
        assert isinstance(await b.client.event(), CloseConnection)
        stats = await b.wait_done()
    # Only the close frame (2 + 4 mask bytes + 2 code bytes) was read by the bridge.
    assert (stats.bytes_up, stats.bytes_down) == (8, 4)


# ------------------------------------------------------------------ closing


async def test_service_eof_closes_with_1000_after_the_data(transport: str) -> None:
    async with bridged(transport) as b:
        await b.service.send_all(b"bye")
        await b.service.send_eof()
        assert await b.client.receive_bytes(3) == b"bye"
        assert await b.client.close_code() == 1000   # and answered
        await b.client.wait_eof()
        stats = await b.wait_done()
    assert stats.end is End.BACKEND_CLOSE


async def test_client_close_is_echoed_and_shuts_the_service_write_side(transport: str) -> None:
    async with bridged(transport) as b:
        await b.client.send(BytesMessage(data=b"last words"))
        await b.client.send(CloseConnection(code=1000, reason="done"))
        assert await b.client.event() == CloseConnection(code=1000, reason="done")
        assert await b.service_reads() == (b"last words", "eof")
        await b.client.wait_eof()
        stats = await b.wait_done()
    assert stats.end is End.CLIENT_CLOSE


async def test_client_eof_without_a_close_frame_shuts_the_service_write_side(transport: str) -> None:
    async with bridged(transport) as b:
        await b.client.send(BytesMessage(data=b"gone"))
        await b.client.stream.send_eof()   # type: ignore[attr-defined]
        assert await b.service_reads() == (b"gone", "eof")
        stats = await b.wait_done()
    assert stats.end is End.CLIENT_CLOSE and "EOF without a close frame" in stats.error


# What the client sends after a good data frame ("fine"), what of it is
# passed on before the violation, the close it gets (fixed per code), what the log says.
VIOLATIONS = {
    "unmasked frame": (b"\x82\x05hello", b"", 1002, "unmasked"),
    "new message inside a fragmented one": (
        masked(0x01, b"frag") + masked(0x81, b"new"),
        b"frag",
        1002,
        "CONTINUATION",
    ),
    "unknown opcode": (masked(0x83, b"x"), b"", 1002, "opcode"),
    "invalid utf-8": (masked(0x81, b"\xc3\x28"), b"", 1007, "utf-8"),
    # The route's limit is 1000: in one read nothing of it is passed on, and
    # never more than the limit (messages are streamed, never held whole).
    "oversize message": (
        Connection(ConnectionType.CLIENT).send(BytesMessage(data=b"y" * 1001)),
        b"",
        1009,
        "max_message_size (1000 bytes)",
    ),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_a_violation_gets_its_close_frame_and_closes_the_service_stream(
    transport: str, name: str, autojump_clock: MockClock
) -> None:
    data, passed, code, detail = VIOLATIONS[name]
    async with bridged(transport, max_message_size=1000) as b:
        # A data frame first, in the same write: it is passed on, the violation is not.
        await b.client.stream.send_all(masked(0x82, b"fine") + data)
        event = await b.client.event()
        told = trio.current_time()
        assert event == CloseConnection(code=code, reason=wsbridge.REASONS[code])
        if code == 1009:
            # The frames still parse: the closing handshake is the usual one.
            await b.client.send(event.response())
        await b.client.wait_eof()
        if code != 1009:
            # Nothing more can be parsed: our write side was shut after the
            # close frame (RFC 6455 section 7.1.1), while the bridge still
            # reads (and drops) what the client sends, for FAIL_LINGER
            # (virtual time: the bound did not run out before the EOF).
            assert trio.current_time() - told < wsbridge.FAIL_LINGER
        served, ending = await b.service_reads()
        stats = await b.wait_done()
    prefix = b"fine" + passed
    assert served[: len(prefix)] == prefix and set(served[len(prefix) :]) <= {ord("y")}, served
    assert len(served) <= len(prefix) + 1000 and ending in ("eof", "reset")
    assert stats.end is End.CLIENT_ERROR and detail.lower() in stats.error.lower(), stats.error


async def test_a_service_error_closes_with_1011(transport: str) -> None:
    async with bridged(transport) as b:
        await b.break_service()
        await b.client.send(BytesMessage(data=b"hello?"))
        assert await b.client.event() == CloseConnection(code=1011, reason="backend error")
        await b.client.send(CloseConnection(code=1011))
        stats = await b.wait_done()
    assert stats.end is End.BACKEND_ERROR and stats.error.startswith("backend: ")


# ------------------------------------------------------------------ timers (virtual time)


async def test_go_away_sends_1001_and_the_answer_ends_it(
    transport: str, autojump_clock: MockClock
) -> None:
    async with bridged(transport) as b:
        b.bridge.go_away_at(trio.current_time() + 10, End.MAX_AGE)
        with trio.fail_after(20):
            event = await b.client.event()
        assert event == CloseConnection(code=1001, reason="going away")
        await b.client.send(event.response())
        await b.client.wait_eof()
        stats = await b.wait_done()
    assert stats.end is End.MAX_AGE


async def test_idle_timeout_sends_1001_but_traffic_keeps_it_open(
    transport: str, autojump_clock: MockClock
) -> None:
    async with bridged(transport, idle_timeout=5) as b:
        started = trio.current_time()
        for _ in range(4):   # client traffic alone keeps the connection alive
            await trio.sleep(3)
            await b.client.send(BytesMessage(data=b"."))
        with trio.fail_after(20):
            event = await b.client.event()
        assert event == CloseConnection(code=1001, reason="idle timeout")
        assert trio.current_time() - started >= 12 + 5   # virtual time: exact enough
        stats = await b.wait_done()   # never answered: cut IDLE_GRACE later
    assert stats.end is End.IDLE_TIMEOUT


async def test_a_client_that_never_answers_the_close_is_cut_at_the_close_timeout(
    transport: str, autojump_clock: MockClock
) -> None:
    async with bridged(transport) as b:
        b.bridge.go_away_at(trio.current_time(), End.SHUTDOWN)
        assert await b.client.event() == CloseConnection(code=1001, reason="going away")
        told = trio.current_time()
        await b.wait_done()
        assert trio.current_time() - told >= wsbridge.CLOSE_TIMEOUT
        await b.client.wait_eof()
    assert b.stats.end is End.SHUTDOWN


async def test_a_client_that_ignores_the_close_after_service_eof_ends_as_half_close_timeout(
    transport: str, autojump_clock: MockClock
) -> None:
    async with bridged(transport, half_close_timeout=2) as b:
        await b.service.send_eof()
        assert await b.client.event() == CloseConnection(code=1000, reason="")
        told = trio.current_time()
        # The client's data still flows to the service meanwhile.
        await b.client.stream.send_all(masked(0x82, b"still here"))
        assert await b.service_gets(10) == b"still here"
        stats = await b.wait_done()
        assert 2 <= trio.current_time() - told < wsbridge.CLOSE_TIMEOUT
    assert stats.end is End.HALF_CLOSE_TIMEOUT
