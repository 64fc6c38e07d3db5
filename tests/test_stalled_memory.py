"""Bounded memory for stalled peers (issue #12 part 5), against a real ``gatewayd run``.

Clients open TLS, upgrade, send 1 MiB and never read. The backend echoes, so
both directions of every connection stall inside the gateway: backend ->
client because the client does not read, client -> backend because the
backend's echo is stuck. Each stalled direction may hold at most one relay
buffer (``CHUNK``) and one TLS record, so the gateway's RSS per stalled
connection stays far below what it was (~290 KiB: a plaintext chunk *and*
its four-record ciphertext in flight each way); and once the clients are
gone the memory goes back to the system (``gatewayd.memory``), instead of
staying at the high-water mark.

The bounds are generous (the figures are RSS of a process on a shared
machine); bench/stalled.py gives the figures, beside nginx's.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from gatewayd import memory
from harness import raw_backend, read_head, switching_protocols
from test_service import Pki, config, pki, running  # noqa: F401  (pki: fixture)

STALLED = 40
SEND = 1 << 20
#: KiB of RSS per stalled connection allowed: one 32 KiB read and one TLS
#: record per direction, OpenSSL's buffers, the connection's objects, slack.
BOUND_KIB = 160


async def echo_after_upgrade(stream: trio.SocketStream) -> None:
    head, rest = await read_head(stream)
    await stream.send_all(switching_protocols(head) + rest)
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def stalled_client(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname="localhost")
    await stream.do_handshake()
    await stream.send_all(
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101 "), head
    with trio.move_on_after(2):   # the gateway stops taking it: that is the point
        await stream.send_all(b"x" * SEND)
    return stream


async def settled_rss(pid: int) -> int:
    """RSS once it stopped growing (two readings 0.5 s apart within 2%)."""
    last = rss_kib(pid)
    for _ in range(20):
        await trio.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) <= last * 0.02:
            return now
        last = now
    return last


async def test_stalled_connections_hold_one_bounded_buffer_and_memory_returns(
    tmp_path: Path, pki: Pki
) -> None:
    async with raw_backend(echo_after_upgrade) as echo_port:
        text = config(echo_port).replace("[gateway]\n", "[gateway]\nidle_timeout = 0\n")
        async with running(tmp_path, text + "\n[log]\naccess_log = false\n") as service:
            pid = service.child.process.pid
            with trio.fail_after(90):
                # Warm up (imports, first contexts, the allocator's arenas).
                warm = [await stalled_client(service.port, pki.context) for _ in range(4)]
                for stream in warm:
                    stream.transport_stream.socket.close()
                await trio.sleep(2)
                before = await settled_rss(pid)
                streams: list[trio.SSLStream[trio.SocketStream]] = []

                async def one() -> None:
                    streams.append(await stalled_client(service.port, pki.context))

                async with trio.open_nursery() as nursery:
                    for _ in range(STALLED):
                        nursery.start_soon(one)
                stalled = await settled_rss(pid)
                per_connection = (stalled - before) / STALLED
                for stream in streams:
                    stream.transport_stream.socket.close()
                # The memory goes back: within half of the growth, polled
                # (the rest is the allocator's arenas, pinned by survivors).
                after = stalled
                with trio.move_on_after(20):
                    while after > before + (stalled - before) / 2:
                        await trio.sleep(0.5)
                        after = rss_kib(pid)
            assert service.alive
    assert per_connection < BOUND_KIB, (before, stalled, per_connection)
    assert after <= before + (stalled - before) / 2, (before, stalled, after)


@pytest.mark.parametrize(
    ("moved", "marked"),
    [(0, False), (memory.TRIM_AFTER_BYTES - 1, False), (memory.TRIM_AFTER_BYTES, True), (10**9, True)],
    ids=["nothing", "below-a-full-chunk", "a-full-chunk", "bulk"],
)
def test_only_tunnels_that_held_big_buffers_ask_for_a_trim(moved: int, marked: bool) -> None:
    memory.release_free_memory()   # clears the mark
    memory.note_release(moved)
    assert memory._marked is marked
    memory.release_free_memory()
    assert memory._marked is False


async def test_the_trim_task_trims_once_marked(autojump_clock: trio.testing.MockClock) -> None:
    memory.release_free_memory()
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(memory.trim_while_marked)
            memory.note_release(memory.TRIM_AFTER_BYTES)
            assert memory._marked
            await trio.sleep(memory.TRIM_INTERVAL + 0.1)
            assert not memory._marked
            nursery.cancel_scope.cancel()
