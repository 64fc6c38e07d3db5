"""Splicing (SPEC section 4): order and integrity, backpressure, half-close, resets, idleness.

Every test drives :func:`gatewayd.splice.splice` between two stream pairs: the
test holds the *peer* ends (``client_peer`` plays the WebSocket client,
``backend_peer`` the backend) and the splice holds the gateway ends. Transports
are trio.testing memory streams (``memory``: unbounded buffers; ``lockstep``:
a send completes only when the reader took every byte), unix socket pairs and
loopback TCP connections (for real resets).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from trio.testing import (
    MockClock,
    lockstep_stream_pair,
    memory_stream_pair,
    wait_all_tasks_blocked,
)

from gatewayd.record import End
from gatewayd.splice import CHUNK, SpliceStats, splice
from gatewayd.tls import ServerTLS, TLSStream

Pair = tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]
MakePair = Callable[[], Awaitable[Pair]]


# ---------------------------------------------------------------------------
# Transports: each returns (peer end, gateway end).
# ---------------------------------------------------------------------------


async def memory_pair() -> Pair:
    return memory_stream_pair()


async def lockstep_pair() -> Pair:
    return lockstep_stream_pair()


async def unix_socket_pair() -> Pair:
    peer, gateway = trio.socket.socketpair()
    return trio.SocketStream(peer), trio.SocketStream(gateway)


async def tcp_pair() -> Pair:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    peer = await trio.open_tcp_stream("127.0.0.1", port)
    gateway = await listener.accept()
    await listener.aclose()
    return peer, gateway


TRANSPORTS = [
    pytest.param(memory_pair, id="memory"),
    pytest.param(lockstep_pair, id="lockstep"),
    pytest.param(unix_socket_pair, id="socketpair"),
    pytest.param(tcp_pair, id="tcp"),
]


@dataclass
class Spliced:
    """A splice running in the background between two peers the test drives."""

    client_peer: trio.abc.HalfCloseableStream
    backend_peer: trio.abc.HalfCloseableStream
    gateway_client: trio.abc.HalfCloseableStream
    gateway_backend: trio.abc.HalfCloseableStream
    stats: SpliceStats = field(default_factory=SpliceStats)
    done: trio.Event = field(default_factory=trio.Event)
    ended_at: float = 0.0

    def peer(self, side: str) -> trio.abc.HalfCloseableStream:
        return self.client_peer if side == "client" else self.backend_peer


async def start_splice(
    nursery: trio.Nursery,
    make_client: MakePair,
    make_backend: MakePair | None = None,
    *,
    idle_timeout: float = 0.0,
    half_close_timeout: float = 0.0,
) -> Spliced:
    client_peer, gateway_client = await make_client()
    backend_peer, gateway_backend = await (make_backend or make_client)()
    spliced = Spliced(client_peer, backend_peer, gateway_client, gateway_backend)

    async def run() -> None:
        await splice(
            gateway_client,
            gateway_backend,
            spliced.stats,
            idle_timeout=idle_timeout,
            half_close_timeout=half_close_timeout,
        )
        spliced.ended_at = trio.current_time()
        spliced.done.set()

    nursery.start_soon(run)
    return spliced


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def exchange(
    sender: trio.abc.SendStream, receiver: trio.abc.ReceiveStream, data: bytes
) -> bytes:
    """Send ``data`` and receive as many bytes on the other end, concurrently
    (a lockstep send only completes once the reader took the bytes)."""
    received: list[bytes] = []

    async def receive() -> None:
        received.append(await receive_exactly(receiver, len(data)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await sender.send_all(data)
    return received[0]


async def assert_eof(stream: trio.abc.ReceiveStream) -> None:
    assert await stream.receive_some(CHUNK) == b""


# ---------------------------------------------------------------------------
# Order and integrity
# ---------------------------------------------------------------------------

SIZE = 4 * 1024 * 1024


@pytest.mark.parametrize("make_pair", TRANSPORTS)
async def test_relays_several_mib_both_ways_intact_and_in_order(make_pair: MakePair) -> None:
    up = random.Random(1).randbytes(SIZE)
    down = random.Random(2).randbytes(SIZE)
    digests: dict[str, tuple[int, str]] = {}

    async def send(stream: trio.abc.SendStream, data: bytes, seed: int) -> None:
        # Writes of random sizes, so chunk boundaries never line up with CHUNK.
        rng = random.Random(seed)
        view = memoryview(data)
        position = 0
        while position < len(data):
            size = rng.randint(1, 3 * CHUNK)
            await stream.send_all(view[position : position + size])
            position += size

    async def receive(stream: trio.abc.ReceiveStream, name: str) -> None:
        digest = hashlib.sha256()
        total = 0
        while chunk := await stream.receive_some(CHUNK):
            digest.update(chunk)
            total += len(chunk)
        digests[name] = (total, digest.hexdigest())

    async def client(peer: trio.abc.HalfCloseableStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, peer, "down")
            await send(peer, up, 3)
            await peer.send_eof()

    async def backend(peer: trio.abc.HalfCloseableStream) -> None:
        # The backend half-closes only after the client's EOF reached it, so
        # the client closed first and the end reason is deterministic.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, peer, down, 4)
            await receive(peer, "up")
        await peer.send_eof()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, make_pair)
            nursery.start_soon(client, spliced.client_peer)
            nursery.start_soon(backend, spliced.backend_peer)
            await spliced.done.wait()

    assert digests == {
        "up": (SIZE, hashlib.sha256(up).hexdigest()),
        "down": (SIZE, hashlib.sha256(down).hexdigest()),
    }
    assert (spliced.stats.bytes_up, spliced.stats.bytes_down) == (SIZE, SIZE)
    assert (spliced.stats.end, spliced.stats.error) == (End.CLIENT_CLOSE, "")


# ---------------------------------------------------------------------------
# Backpressure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["client", "backend"], ids=["up", "down"])
async def test_pump_stops_reading_while_the_destination_does_not_read(source: str) -> None:
    """Memory source with 10 chunks waiting, lockstep destination that does
    not read: the pump reads once, then waits; each chunk the destination
    takes lets exactly one more read happen."""
    destination = "backend" if source == "client" else "client"
    data = random.Random(5).randbytes(10 * CHUNK)
    reads = 0

    async def count_read() -> None:
        nonlocal reads
        reads += 1

    make = {source: memory_pair, destination: lockstep_pair}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, make["client"], make["backend"])
            gateway_source = (
                spliced.gateway_client if source == "client" else spliced.gateway_backend
            )
            gateway_source.receive_stream.receive_some_hook = count_read
            source_peer, destination_peer = spliced.peer(source), spliced.peer(destination)
            await source_peer.send_all(data)  # memory streams buffer it all at once
            await wait_all_tasks_blocked()
            counted = "bytes_up" if source == "client" else "bytes_down"

            assert reads == 1
            assert getattr(spliced.stats, counted) == 0
            await wait_all_tasks_blocked()
            assert reads == 1

            first = await receive_exactly(destination_peer, CHUNK)
            await wait_all_tasks_blocked()
            assert first == data[:CHUNK]
            assert reads == 2
            assert getattr(spliced.stats, counted) == CHUNK

            rest = await receive_exactly(destination_peer, len(data) - CHUNK)
            await wait_all_tasks_blocked()
            assert first + rest == data
            assert getattr(spliced.stats, counted) == len(data)

            await source_peer.send_eof()
            await assert_eof(destination_peer)
            await destination_peer.send_eof()
            await assert_eof(source_peer)
            await spliced.done.wait()
    assert spliced.stats.end == f"{source}_close"


@pytest.mark.parametrize("source", ["client", "backend"], ids=["up", "down"])
async def test_socket_writer_is_blocked_while_the_destination_does_not_read(source: str) -> None:
    """Real sockets: with a reader that stops, the splice holds no more than
    the destination socket's buffers, and the writer on the source blocks."""
    total = 32 * 1024 * 1024
    data = random.Random(6).randbytes(total)
    destination = "backend" if source == "client" else "client"
    written = trio.Event()
    counted = "bytes_up" if source == "client" else "bytes_down"

    async def write(stream: trio.abc.SendStream) -> None:
        await stream.send_all(data)
        written.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, unix_socket_pair)
            source_peer, destination_peer = spliced.peer(source), spliced.peer(destination)
            gateway_destination = (
                spliced.gateway_backend if source == "client" else spliced.gateway_client
            )
            assert isinstance(gateway_destination, trio.SocketStream)
            assert isinstance(destination_peer, trio.SocketStream)
            # What the splice may have handed to the kernel towards a reader
            # that does not read: the two socket buffers on that path.
            buffered = gateway_destination.getsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF
            ) + destination_peer.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            nursery.start_soon(write, source_peer)
            await wait_all_tasks_blocked(cushion=0.05)

            assert not written.is_set()
            assert 0 < getattr(spliced.stats, counted) <= buffered
            assert buffered < total // 4

            received = await receive_exactly(destination_peer, total)
            await written.wait()
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            assert getattr(spliced.stats, counted) == total

            await source_peer.send_eof()
            await assert_eof(destination_peer)
            await destination_peer.send_eof()
            await assert_eof(source_peer)
            await spliced.done.wait()
    assert spliced.stats.end == f"{source}_close"


# ---------------------------------------------------------------------------
# Half-close
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_pair", TRANSPORTS)
@pytest.mark.parametrize(
    ("first", "end"),
    [("client", End.CLIENT_CLOSE), ("backend", End.BACKEND_CLOSE)],
    ids=["client-eof-first", "backend-eof-first"],
)
async def test_half_close_is_passed_on_and_the_other_way_keeps_flowing(
    make_pair: MakePair, first: str, end: str
) -> None:
    other = "backend" if first == "client" else "client"
    hello = f"{first} says hello".encode()
    after = f"{other} still talking after the half-close".encode()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, make_pair)
            closer, talker = spliced.peer(first), spliced.peer(other)

            assert await exchange(closer, talker, hello) == hello
            await closer.send_eof()
            await assert_eof(talker)

            assert await exchange(talker, closer, after) == after
            assert await exchange(talker, closer, after) == after
            await wait_all_tasks_blocked()
            assert not spliced.done.is_set()

            await talker.send_eof()
            await assert_eof(closer)
            await spliced.done.wait()

    up, down = (hello, 2 * after) if first == "client" else (2 * after, hello)
    assert (spliced.stats.bytes_up, spliced.stats.bytes_down) == (len(up), len(down))
    assert (spliced.stats.end, spliced.stats.error) == (end, "")


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a throwaway trustme CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.mark.parametrize(
    ("tls_side", "first", "end"),
    [
        ("client", "backend", End.BACKEND_CLOSE),
        ("backend", "client", End.CLIENT_CLOSE),
    ],
    ids=["backend-eof-onto-tls-client", "client-eof-onto-tls-backend"],
)
async def test_eof_onto_a_stream_without_half_close_closes_it_cleanly(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], tls_side: str, first: str, end: str
) -> None:
    """trio.SSLStream cannot half-close: the EOF is passed on by closing it
    (close_notify), which ends the splice as a clean close, not an error."""
    server_context, client_context = tls_contexts

    async def tls_pair() -> Pair:
        peer_transport, gateway_transport = memory_stream_pair()
        if tls_side == "client":  # the gateway is the TLS server
            peer = trio.SSLStream(peer_transport, client_context, server_hostname="localhost")
            gateway = trio.SSLStream(gateway_transport, server_context, server_side=True)
        else:  # the gateway is a TLS client of the backend (wss://)
            peer = trio.SSLStream(peer_transport, server_context, server_side=True)
            gateway = trio.SSLStream(gateway_transport, client_context, server_hostname="localhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.do_handshake)
            nursery.start_soon(gateway.do_handshake)
        return peer, gateway  # type: ignore[return-value]

    make = {tls_side: tls_pair, first: memory_pair}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, make["client"], make["backend"])
            assert not isinstance(
                spliced.peer(tls_side), trio.abc.HalfCloseableStream
            ), "precondition: the TLS side cannot half-close"
            closer, tls_peer = spliced.peer(first), spliced.peer(tls_side)
            assert await exchange(closer, tls_peer, b"last words") == b"last words"
            await closer.send_eof()
            await assert_eof(tls_peer)
            await spliced.done.wait()

    up, down = (10, 0) if first == "client" else (0, 10)
    assert (spliced.stats.bytes_up, spliced.stats.bytes_down) == (up, down)
    assert (spliced.stats.end, spliced.stats.error) == (end, "")


# ---------------------------------------------------------------------------
# Resets and broken streams
# ---------------------------------------------------------------------------


async def reset(stream: trio.abc.Stream) -> None:
    """Close a TCP connection with an RST (SO_LINGER 0), as a crashed peer does."""
    assert isinstance(stream, trio.SocketStream)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.parametrize(
    ("side", "end"),
    [("client", End.CLIENT_ERROR), ("backend", End.BACKEND_ERROR)],
    ids=["client-reset", "backend-reset"],
)
async def test_tcp_reset_ends_the_splice_at_once_without_raising(side: str, end: str) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, tcp_pair)
            assert await exchange(spliced.client_peer, spliced.backend_peer, b"up") == b"up"
            assert await exchange(spliced.backend_peer, spliced.client_peer, b"down!") == b"down!"
            await reset(spliced.peer(side))
            await spliced.done.wait()

    assert (spliced.stats.bytes_up, spliced.stats.bytes_down) == (2, 5)
    assert spliced.stats.end == end
    assert spliced.stats.error == f"{side}: ConnectionResetError: [Errno 104] Connection reset by peer"


@pytest.mark.parametrize(
    ("gone", "end"),
    [("client", End.CLIENT_ERROR), ("backend", End.BACKEND_ERROR)],
    ids=["client-gone-backend-writes", "backend-gone-client-writes"],
)
async def test_writing_to_a_closed_peer_ends_the_splice_as_its_error(gone: str, end: str) -> None:
    """Lockstep: the peer closes (no EOF-then-read): the next relayed write
    raises BrokenResourceError, the splice ends at once and does not raise."""
    writer = "backend" if gone == "client" else "client"
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, lockstep_pair)
            await spliced.peer(gone).aclose()
            await wait_all_tasks_blocked()
            # The close reads as EOF on the gone side's direction: passed on.
            await assert_eof(spliced.peer(writer))
            assert not spliced.done.is_set()
            # The splice takes these bytes, then fails to hand them on.
            await spliced.peer(writer).send_all(b"anyone there?")
            await spliced.done.wait()

    assert (spliced.stats.bytes_up, spliced.stats.bytes_down) == (0, 0)
    assert spliced.stats.end == end
    assert spliced.stats.error == f"{gone}: BrokenResourceError: "


# ---------------------------------------------------------------------------
# Idle timeout (virtual time)
# ---------------------------------------------------------------------------

IDLE = 10.0


@pytest.mark.parametrize(
    ("schedule", "ends_at"),
    [
        pytest.param([], 10.0, id="no-traffic"),
        pytest.param([(6, "up"), (6, "up"), (6, "up")], 28.0, id="client-traffic-keeps-it-open"),
        pytest.param([(9, "down"), (9, "down")], 28.0, id="backend-traffic-keeps-it-open"),
        pytest.param([(5, "up"), (7, "down"), (9, "up")], 31.0, id="alternating-traffic"),
        pytest.param([(4, "up"), (2, "client-eof"), (7, "down")], 23.0, id="after-half-close"),
    ],
)
async def test_idle_timeout_counts_from_the_last_byte_either_way(
    autojump_clock: MockClock, schedule: list[tuple[float, str]], ends_at: float
) -> None:
    sent = {"up": 0, "down": 0}
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            spliced = await start_splice(nursery, memory_pair, idle_timeout=IDLE)
            for delay, action in schedule:
                await trio.sleep(delay)
                if action == "client-eof":
                    await spliced.client_peer.send_eof()
                    await assert_eof(spliced.backend_peer)
                    continue
                sender, receiver = (
                    (spliced.client_peer, spliced.backend_peer)
                    if action == "up"
                    else (spliced.backend_peer, spliced.client_peer)
                )
                assert await exchange(sender, receiver, action.encode()) == action.encode()
                sent[action] += len(action)
            await spliced.done.wait()

    assert spliced.ended_at - started == pytest.approx(ends_at)
    assert (spliced.stats.bytes_up, spliced.stats.bytes_down) == (sent["up"], sent["down"])
    assert (spliced.stats.end, spliced.stats.error) == (End.IDLE_TIMEOUT, "")


async def test_idle_timeout_zero_never_expires(autojump_clock: MockClock) -> None:
    with trio.fail_after(10**7):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, memory_pair, idle_timeout=0)
            await trio.sleep(10**6)
            assert not spliced.done.is_set()
            await spliced.backend_peer.send_eof()
            await assert_eof(spliced.client_peer)
            await spliced.client_peer.send_eof()
            await assert_eof(spliced.backend_peer)
            await spliced.done.wait()
    assert spliced.stats.end == End.BACKEND_CLOSE


# ---------------------------------------------------------------------------
# half_close_timeout: once one direction ended, the other has that long
# ---------------------------------------------------------------------------

HALF = 10.0


@pytest.mark.parametrize(
    ("first", "idle_timeout", "schedule", "ends_at", "end"),
    [
        # Counted from the first EOF, whichever side sent it.
        pytest.param("backend", 0.0, [], 10.0, End.HALF_CLOSE_TIMEOUT, id="client-ignores-backend-fin"),
        pytest.param("client", 0.0, [], 10.0, End.HALF_CLOSE_TIMEOUT, id="backend-ignores-client-fin"),
        # Traffic in the open direction does not push it back: the bound is on
        # the half-closed state, not on idleness.
        pytest.param(
            "backend", 0.0, [(4, "up"), (4, "up")], 10.0, End.HALF_CLOSE_TIMEOUT, id="traffic-does-not-extend-it"
        ),
        # A shorter idle_timeout still applies within it, as itself.
        pytest.param("backend", 3.0, [], 3.0, End.IDLE_TIMEOUT, id="shorter-idle-timeout-first"),
        pytest.param(
            "backend", 6.0, [(4, "up")], 10.0, End.HALF_CLOSE_TIMEOUT, id="idle-deadline-capped-by-it"
        ),
        # The other side ending in time is an ordinary end.
        pytest.param("backend", 0.0, [(9, "eof")], 9.0, End.BACKEND_CLOSE, id="other-side-ends-in-time"),
    ],
)
async def test_half_close_timeout_bounds_the_half_closed_state(
    autojump_clock: MockClock,
    first: str,
    idle_timeout: float,
    schedule: list[tuple[float, str]],
    ends_at: float,
    end: End,
) -> None:
    other = "client" if first == "backend" else "backend"
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(
                nursery, memory_pair, idle_timeout=idle_timeout, half_close_timeout=HALF
            )
            closer, talker = spliced.peer(first), spliced.peer(other)
            await closer.send_eof()
            await assert_eof(talker)
            started = trio.current_time()
            for delay, action in schedule:
                await trio.sleep(delay)
                if action == "eof":
                    await talker.send_eof()
                    await assert_eof(closer)
                else:
                    assert await exchange(talker, closer, b"late") == b"late"
            await spliced.done.wait()
    assert spliced.ended_at - started == pytest.approx(ends_at)
    assert (spliced.stats.end, spliced.stats.error) == (end, "")


async def test_half_close_timeout_zero_is_for_ever(autojump_clock: MockClock) -> None:
    with trio.fail_after(10**7):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, memory_pair, half_close_timeout=0)
            await spliced.backend_peer.send_eof()
            await assert_eof(spliced.client_peer)
            await trio.sleep(10**6)
            assert not spliced.done.is_set()
            assert await exchange(spliced.client_peer, spliced.backend_peer, b"late") == b"late"
            await spliced.client_peer.send_eof()
            await assert_eof(spliced.backend_peer)
            await spliced.done.wait()
    assert spliced.stats.end == End.BACKEND_CLOSE


async def test_half_close_timeout_does_not_run_before_a_half_close(autojump_clock: MockClock) -> None:
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, memory_pair, half_close_timeout=HALF)
            await trio.sleep(10 * HALF)
            assert not spliced.done.is_set()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("idle_timeout", [0.0, 100.0], ids=["no-idle-timeout", "idle-timeout-later"])
async def test_cancellation_from_outside_propagates_and_records_nothing(
    autojump_clock: MockClock, idle_timeout: float
) -> None:
    """Shutdown cancels the splice from outside: the caller records the end."""
    client_peer, gateway_client = memory_stream_pair()
    backend_peer, gateway_backend = memory_stream_pair()
    stats = SpliceStats()
    started = trio.current_time()
    with trio.fail_after(1000):
        with trio.move_on_after(5) as shutdown:
            await splice(gateway_client, gateway_backend, stats, idle_timeout=idle_timeout)
    assert shutdown.cancelled_caught
    assert trio.current_time() - started == pytest.approx(5.0)
    assert (stats.end, stats.error, stats.bytes_up, stats.bytes_down) == (None, "", 0, 0)


async def test_reset_after_the_other_side_closed_cleanly_is_an_ordinary_end() -> None:
    """The backend closed first; the client then drops the connection (a
    browser closing TCP without close_notify): nothing was lost, so the end is
    the backend's close, not an error."""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, tcp_pair)
            await spliced.backend_peer.send_eof()
            await assert_eof(spliced.client_peer)
            await reset(spliced.client_peer)
            await spliced.done.wait()
    assert spliced.stats.end == End.BACKEND_CLOSE
    assert "ConnectionResetError" in spliced.stats.error


@pytest.mark.parametrize("stalled", ["backend", "client"])
async def test_a_destination_that_never_reads_ends_the_splice(
    stalled: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """Nothing reads from one side: the blocked write gives up after
    STALL_TIMEOUT, so the connection (and its slots) cannot be pinned forever."""
    import gatewayd.splice as splice_module

    monkeypatch.setattr(splice_module, "STALL_TIMEOUT", 30.0)
    writer = "client" if stalled == "backend" else "backend"
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, lockstep_pair)
            start = trio.current_time()
            await spliced.peer(writer).send_all(b"nobody reads this")
            await spliced.done.wait()
    assert spliced.ended_at - start == pytest.approx(30.0, abs=0.5)
    assert spliced.stats.end == (End.BACKEND_ERROR if stalled == "backend" else End.CLIENT_ERROR)
    assert "read nothing for 30s" in spliced.stats.error



def tls_over_tcp(folder: Path) -> MakePair:
    """(a client TLSStream, the gateway's server TLSStream from ServerTLS) over real
    TCP: the splice then sends to the client with send_all_in_loop over SocketIO."""
    from test_tls import CertFiles, make_config, make_host, pyopenssl_client_context

    files = CertFiles(folder)
    server_tls = ServerTLS.from_config(make_config(files, [make_host(files, 0, ["example.com"])]))

    async def make() -> Pair:
        peer, gateway = await tcp_pair()
        client = TLSStream(peer, pyopenssl_client_context(), server_side=False, server_hostname="example.com")
        server = server_tls.wrap(gateway)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        return client, server

    return make


@pytest.mark.parametrize(
    ("stalled", "client_transport"),
    [
        pytest.param("backend", "tcp", id="tcp-backend-never-reads"),
        pytest.param("client", "tcp", id="tcp-client-never-reads"),
        pytest.param("client", "tls", id="tls-client-never-reads"),
    ],
)
async def test_a_real_socket_that_never_reads_ends_the_splice(
    stalled: str, client_transport: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same bound over real sockets, where the splice's sends go through
    SocketIO and TLSStream.send_all_in_loop: the timer runs only while a send
    waits for room, and fires after STALL_TIMEOUT without the reader reading."""
    import gatewayd.splice as splice_module

    monkeypatch.setattr(splice_module, "STALL_TIMEOUT", 0.5)
    make_client = tls_over_tcp(tmp_path) if client_transport == "tls" else tcp_pair
    writer = "client" if stalled == "backend" else "backend"
    chunk = b"x" * 65536
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            spliced = await start_splice(nursery, make_client, tcp_pair)

            async def flood() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while True:
                        await spliced.peer(writer).send_all(chunk)

            nursery.start_soon(flood)
            await spliced.done.wait()
            nursery.cancel_scope.cancel()
    assert spliced.stats.end == (End.BACKEND_ERROR if stalled == "backend" else End.CLIENT_ERROR)
    assert "read nothing for 0.5s" in spliced.stats.error
