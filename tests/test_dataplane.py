"""Spliced connections end to end, written to guard the data-plane handover (issue #12).

Today every spliced connection (passthrough ``ws://`` and the ``tcp://`` bridge)
is one trio task; issue #12 moves them to a per-process epoll data plane with
OpenSSL bound to the socket after the handshake. These tests pin down what
must not change across that move, with real TLS clients, real backends on
127.0.0.1 and either the real ``gatewayd run`` (reload, drain, CPU time) or
its server task (:class:`gatewayd.server.Gateway`):

1. application data that arrives *with* the client's Finished, in one TCP
   segment (a client on :class:`ssl.MemoryBIO`, TLS 1.3 and a resumed TLS
   1.2 session), in one record or several, and bytes pipelined right after
   the 101: echoed complete and in order, the access line's byte counts exact;
2. early data (``openssl s_client -early_data``): never accepted as 0-RTT,
   the resumed connection then works with 1-RTT data;
3. TLS 1.3 KeyUpdate (``s_client``'s ``K`` and ``k``) between echoes and in
   the middle of a large stream to the client: every byte arrives and a
   requested update is answered;
4. a SIGHUP and a SIGTERM drain while 50 connections sit spliced;
5. stalled peers cost no CPU: both directions blocked, or one blocked while
   the other flows, the daemon's utime+stime stays near zero;
6. idle, max_connection_age and half-close for connections that are past
   the handshake and have been quiet for a while.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event

from harness import (
    Certs,
    Running,
    make_certs,
    raw_backend,
    read_head,
    running_gateway,
    switching_protocols,
    upgrade_request,
)
from test_service import Pki, Service, pki, running  # noqa: F401  (pki: fixture)

#: Bound on any one step of a test (connect, upgrade, an echo, a close).
STEP = 10.0
#: What the passthrough backend sends right after its 101, in the same write.
GREETING = b"greeting-from-backend"
#: What the bridge's TCP service sends as soon as it is connected.
TCP_GREETING = b"tcp-greeting"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    certs.issue("localhost", "127.0.0.1")
    return certs


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


async def raw_echo(stream: trio.SocketStream) -> None:
    """Passthrough backend: 101 (+ GREETING in the same write), then echo raw bytes until EOF."""
    try:
        head, rest = await read_head(stream)
        await stream.send_all(switching_protocols(head) + GREETING)
        if rest:
            await stream.send_all(rest)
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        pass


async def plain_echo(stream: trio.SocketStream) -> None:
    """Passthrough backend without a greeting (s_client reads exactly what it sent)."""
    try:
        head, rest = await read_head(stream)
        await stream.send_all(switching_protocols(head) + rest)
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        pass


async def tcp_echo(stream: trio.SocketStream) -> None:
    """Bridge service: TCP_GREETING, then echo until EOF."""
    try:
        await stream.send_all(TCP_GREETING)
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def tcp_quiet_echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# ---------------------------------------------------------------------------
# In-process gateway (its server task) with a passthrough and a bridge route
# ---------------------------------------------------------------------------


def gateway_config(directory: Path, certs: Certs, routes: dict[str, str], gateway: str = "", tls: str = "") -> Path:
    d = certs.directory
    route_text = "".join(
        f'\n[[host.route]]\npath = "{path}"\nbackend = "{backend}"\n' for path, backend in routes.items()
    )
    text = textwrap.dedent(
        f"""
        [gateway]
        handshake_timeout = 5.0
        {gateway}

        [tls]
        {tls}

        [[listener]]
        address = "127.0.0.1:0"

        [[host]]
        names = ["localhost", "127.0.0.1"]
        certificate = "{d}/localhost.pem"
        private_key = "{d}/localhost.key"
        """
    ) + route_text
    path = directory / "gatewayd.toml"
    path.write_text(text)
    return path


@asynccontextmanager
async def gateway_with(
    certs: Certs,
    tmp_path: Path,
    gateway: str = "",
    tls: str = "",
    backends: dict[str, Callable[[trio.SocketStream], Awaitable[None]]] | None = None,
) -> AsyncIterator[Running]:
    """The server task with /echo (passthrough to raw_echo) and /bridge (tcp:// to tcp_echo),
    plus one passthrough route per extra ``backends`` entry."""
    async with AsyncExitStack() as stack:
        routes = {
            "/echo": f"ws://127.0.0.1:{await stack.enter_async_context(raw_backend(raw_echo))}",
            "/bridge": f"tcp://127.0.0.1:{await stack.enter_async_context(raw_backend(tcp_echo))}",
        }
        for path, handler in (backends or {}).items():
            routes[path] = f"ws://127.0.0.1:{await stack.enter_async_context(raw_backend(handler))}"
        gw = await stack.enter_async_context(
            running_gateway(gateway_config(tmp_path, certs, routes, gateway, tls))
        )
        yield gw


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == "gatewayd.access"]  # type: ignore[attr-defined]


async def wait_access(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[dict[str, Any]]:
    with trio.fail_after(STEP):
        while len(access_records(caplog)) < count:
            await trio.sleep(0.01)
    return access_records(caplog)


async def wait_upgraded_access(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[dict[str, Any]]:
    """The access lines of upgraded connections, once there are ``count`` of them."""
    with trio.fail_after(STEP):
        while len(found := [a for a in access_records(caplog) if a["status"] == 101]) < count:
            await trio.sleep(0.01)
    return found


def bridged(data: bytes) -> tuple[bytes, list[Event]]:
    """The binary payloads and every event in what a bridge sent after its 101."""
    reader = Connection(ConnectionType.CLIENT)
    reader.receive_data(data)
    events = list(reader.events())
    return b"".join(e.data for e in events if isinstance(e, BytesMessage)), events


def client_frame(payload: bytes, ws: Connection | None = None) -> bytes:
    """One masked binary frame, as a client sends it."""
    return (ws or Connection(ConnectionType.CLIENT)).send(BytesMessage(data=payload))


def payloads(seed: int, sizes: list[int]) -> list[bytes]:
    return [hashlib.shake_256(f"{seed}-{i}".encode()).digest(size) for i, size in enumerate(sizes)]


# ---------------------------------------------------------------------------
# 1. Data arriving with the client's Finished: a client on memory BIOs
# ---------------------------------------------------------------------------


class MemoryClient:
    """TLS over two :class:`ssl.MemoryBIO`: the test decides what goes into each TCP send.

    :meth:`handshake` stops with the client's last flight (TLS 1.3: its
    Finished; a resumed TLS 1.2 session: ChangeCipherSpec + Finished) still in
    the outgoing BIO; every :meth:`write` then adds one TLS record behind it
    (up to 16 KiB of plaintext per record), and :meth:`flush` sends all of it
    in one ``send`` — one segment on loopback.
    """

    def __init__(
        self, sock: trio.socket.SocketType, context: ssl.SSLContext, session: ssl.SSLSession | None = None
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost", session=session)
        self.sent_plaintext = 0
        self.received = bytearray()
        self.closed = False

    @classmethod
    async def connect(
        cls, port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
    ) -> MemoryClient:
        sock = trio.socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(("127.0.0.1", port))
        return cls(sock, context, session)

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def _feed(self) -> None:
        data = await self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    await self._send(self.outgoing.read())
                await self._feed()
        assert self.outgoing.pending, "the client's last flight was sent already"

    def write(self, data: bytes) -> None:
        """One TLS record per 16 KiB (Python writes a record per call and per 16 KiB)."""
        self.tls.write(data)
        self.sent_plaintext += len(data)

    async def flush(self) -> None:
        await self._send(self.outgoing.read())

    async def receive(self) -> bytes:
        """Some plaintext; b"" at close_notify or EOF."""
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                if self.outgoing.pending:  # a KeyUpdate answer, say
                    await self.flush()
                await self._feed()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.closed = True
                return b""
            if not data:
                self.closed = True
                return b""
            self.received += data
            return data

    async def receive_until(self, predicate: Callable[[bytes], bool]) -> None:
        with trio.fail_after(STEP):
            while not predicate(bytes(self.received)):
                if not await self.receive():
                    raise EOFError(f"EOF after {len(self.received)} bytes: {bytes(self.received[:200])!r}")

    async def close_notify(self) -> None:
        """Send close_notify (our half-close inside TLS)."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        await self.flush()

    def aclose(self) -> None:
        self.sock.close()


def context_for(certs: Certs, version: str) -> ssl.SSLContext:
    tls = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    return certs.client_context(minimum=tls, maximum=tls)


async def session_for(port: int, context: ssl.SSLContext) -> ssl.SSLSession:
    """A TLS 1.2 session from one full handshake (then closed cleanly), to resume."""
    client = await MemoryClient.connect(port, context)
    while True:
        try:
            client.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if client.outgoing.pending:
                await client._send(client.outgoing.read())
            await client._feed()
    if client.outgoing.pending:
        await client.flush()
    session = client.tls.session
    assert session is not None
    await client.close_notify()
    client.aclose()
    return session


LAYOUTS = ["one-record", "records-in-one-segment", "many-records"]


def first_flight(layout: str, request: bytes, frames: list[bytes]) -> list[bytes]:
    """The plaintext writes (one TLS record each, up to 16 KiB) that follow the Finished."""
    if layout == "one-record":
        return [request + frames[0], *frames[1:]]
    if layout == "records-in-one-segment":
        return [request, *frames]
    # Request head split over two records, then one record per frame.
    return [request[:20], request[20:], *frames]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("version", ["1.3", "1.2"], ids=["tls1.3", "tls1.2-resumed"])
@pytest.mark.parametrize("route", ["passthrough", "bridge"])
async def test_data_in_the_segment_of_the_finished_is_echoed_in_order(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str, version: str, layout: str
) -> None:
    """Finished, request head and first frames in ONE TCP send; then more frames in one
    send as soon as the 101 is in: everything is echoed, in order; the access line
    counts exactly the plaintext each way."""
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    context = context_for(certs, version)
    path = "/echo" if route == "passthrough" else "/bridge"
    sizes = [5, 1000, 3] if layout != "many-records" else [5, 40000, *range(1, 30), 16000]
    first = payloads(1, sizes)
    later = payloads(2, [7, 20000, 1, 300])
    ws = Connection(ConnectionType.CLIENT)
    first_frames = [client_frame(p, ws) for p in first]
    later_frames = [client_frame(p, ws) for p in later]
    request = upgrade_request(path, "localhost")
    async with gateway_with(certs, tmp_path) as gw:
        with trio.fail_after(30):
            session = await session_for(gw.port, context) if version == "1.2" else None
            client = await MemoryClient.connect(gw.port, context, session)
            await client.handshake()
            if version == "1.2":
                assert client.tls.session_reused, "the TLS 1.2 session was not resumed"
            for data in first_flight(layout, request, first_frames):
                client.write(data)
            await client.flush()   # Finished + request + frames: one send
            await client.receive_until(lambda data: b"\r\n\r\n" in data)
            head = bytes(client.received).partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            assert head.startswith(b"HTTP/1.1 101 "), head
            for frame in later_frames:   # pipelined right after the 101, one send
                client.write(frame)
            await client.flush()
            if route == "passthrough":
                expected = GREETING + b"".join(first_frames) + b"".join(later_frames)
                await client.receive_until(lambda data: len(data) >= len(head) + len(expected))
                await client.close_notify()   # the backend's EOF follows, then the gateway's close_notify
                with trio.fail_after(STEP):
                    while await client.receive():
                        pass
                assert bytes(client.received[len(head) :]) == expected
            else:
                expected = TCP_GREETING + b"".join(first) + b"".join(later)
                await client.receive_until(
                    lambda data: len(bridged(data[len(head) :])[0]) >= len(expected)
                )
                got, _ = bridged(bytes(client.received[len(head) :]))
                assert bytes(got) == expected
                close = ws.send(CloseConnection(code=1000))
                client.write(close)
                await client.flush()
                # The close answer, then the end of the connection.
                with trio.fail_after(STEP):
                    while await client.receive():
                        pass
                _, events = bridged(bytes(client.received[len(head) :]))
                assert isinstance(events[-1], CloseConnection) and events[-1].code == 1000, events[-1:]
            (access,) = await wait_upgraded_access(caplog)
            client.aclose()
    assert access["end"] == "client_close", access
    assert access["bytes_in"] == client.sent_plaintext, (access, client.sent_plaintext)
    assert access["bytes_out"] == len(client.received), (access, len(client.received))


# ---------------------------------------------------------------------------
# openssl s_client, driven through its stdin and stdout
# ---------------------------------------------------------------------------


READ_BLOCK = b"read R BLOCK\n"


@dataclass
class SClient:
    """A running ``openssl s_client``: what it printed so far on stdout and stderr."""

    process: trio.Process
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)

    async def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(data)

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def wait_out(self, predicate: Callable[[bytes], bool], what: str) -> None:
        with trio.move_on_after(STEP):
            while not predicate(bytes(self.out)):
                await trio.sleep(0.005)
            return
        pytest.fail(f"s_client never printed {what}\nstdout: {bytes(self.out)[-2000:]!r}\nstderr: {bytes(self.err)!r}")

    async def wait_err(self, needle: bytes, count: int = 1) -> None:
        with trio.move_on_after(STEP):
            while self.err.count(needle) < count:
                await trio.sleep(0.005)
            return
        pytest.fail(f"s_client never printed {needle!r} x{count} on stderr: {bytes(self.err)!r}")

    async def wait_exit(self) -> int:
        with trio.fail_after(STEP):
            return await self.process.wait()

    def body(self) -> bytes:
        """stdout after the 101's head, without s_client's own "read R BLOCK" notes
        (printed between two reads when a record carried no application data)."""
        out = bytes(self.out)
        start = out.index(b"HTTP/1.1 101 ")
        return out[out.index(b"\r\n\r\n", start) + 4 :].replace(READ_BLOCK, b"")


def ends_with(expected: bytes) -> Callable[[bytes], bool]:
    """A wait_out predicate: stdout (without s_client's notes) ends with ``expected``."""
    return lambda out: out.replace(READ_BLOCK, b"").endswith(expected)


def longer_than(size: int) -> Callable[[bytes], bool]:
    return lambda out: len(out) > size


async def _pump(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    assert stream is not None
    while data := await stream.receive_some(1 << 20):
        into += data


@asynccontextmanager
async def s_client(port: int, certs: Certs, *options: str) -> AsyncIterator[SClient]:
    ca = certs.directory / "ca.pem"
    if not ca.exists():
        certs.ca.cert_pem.write_to_path(str(ca))
    argv = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", str(ca), "-verify_return_error", *options,
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    client = SClient(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, process.stdout, client.out)
            nursery.start_soon(_pump, process.stderr, client.err)
            yield client
            with trio.move_on_after(STEP):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STEP):
                await process.wait()


def upgrade_lines(path: str = "/echo", *extra: str) -> bytes:
    """An upgrade request as s_client -crlf sends it (LF here, CRLF on the wire)."""
    return upgrade_request(path, "localhost", *extra).replace(b"\r\n", b"\n")


# ---------------------------------------------------------------------------
# 2. Early data is never accepted as 0-RTT
# ---------------------------------------------------------------------------


@dataclass
class HeadRecorder:
    """A passthrough backend that records every request head, then echoes."""

    heads: list[bytes] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)

    async def handler(self, stream: trio.SocketStream) -> None:
        try:
            head, rest = await read_head(stream)
            self.heads.append(head)
            self.data += rest
            await stream.send_all(switching_protocols(head) + rest)
            while data := await stream.receive_some(65536):
                self.data += data
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass


@pytest.mark.parametrize("tickets", ["stateful", "stateless"])
async def test_early_data_is_not_accepted_and_the_resumed_connection_works(
    certs: Certs, tmp_path: Path, tickets: str
) -> None:
    """0-RTT data could be replayed: the gateway never accepts it (OpenSSL's default,
    max_early_data 0). s_client resumes the session and offers the file as early
    data; it reports the early data not sent or rejected, the upgrade sent after
    the handshake gets its 101 and echoes, and the early request never reaches
    the backend."""
    recorder = HeadRecorder()
    session = tmp_path / "session.pem"
    early = tmp_path / "early.txt"
    early.write_bytes(upgrade_request("/recorded", "localhost", "X-Early: 1") + b"early payload\n")
    tls = "session_tickets = true" if tickets == "stateless" else ""
    async with gateway_with(certs, tmp_path, tls=tls, backends={"/recorded": recorder.handler}) as gw:
        with trio.fail_after(40):
            async with s_client(gw.port, certs, "-tls1_3", "-crlf", "-sess_out", str(session)) as first:
                await first.write(upgrade_lines("/recorded"))
                await first.wait_out(lambda out: b"HTTP/1.1 101 " in out, "the first 101")
                await first.write(b"first line\n")
                await first.wait_out(lambda out: b"first line\r\n" in out, "the first echo")
                await first.close_stdin()
                assert await first.wait_exit() == 0
            assert session.stat().st_size > 0, "no session saved"
            async with s_client(
                gw.port, certs, "-tls1_3", "-crlf", "-sess_in", str(session), "-early_data", str(early)
            ) as second:
                await second.wait_out(lambda out: b"Early data was" in out, "what became of the early data")
                await second.write(upgrade_lines("/recorded"))
                await second.wait_out(lambda out: b"HTTP/1.1 101 " in out, "the second 101")
                await second.write(b"after the handshake\n")
                await second.wait_out(lambda out: b"after the handshake\r\n" in out, "the 1-RTT echo")
                await second.close_stdin()
                assert await second.wait_exit() == 0
    out = bytes(second.out)
    assert b"Reused, TLSv1.3" in out, out[:3000]
    assert b"Early data was accepted" not in out, out[:3000]
    assert re.search(rb"Early data was (not sent|rejected)", out), out[:3000]
    # (s_client prints the session tickets it gets among the data: no exact body here.)
    assert second.body().startswith(b"after the handshake\r\n"), second.body()
    assert len(recorder.heads) == 2, recorder.heads
    assert not any(b"X-Early" in head for head in recorder.heads), recorder.heads
    assert bytes(recorder.data) == b"first line\r\nafter the handshake\r\n"


# ---------------------------------------------------------------------------
# 3. KeyUpdate (TLS 1.3) on a spliced connection
# ---------------------------------------------------------------------------

KEY_UPDATE_RECEIVED = re.compile(r"<<< TLS 1\.3, Handshake \[length [0-9a-f]+\], KeyUpdate")


def key_updates_received(messages: Path) -> int:
    """KeyUpdate messages s_client received (its -msg trace, written to -msgfile)."""
    return len(KEY_UPDATE_RECEIVED.findall(messages.read_text(errors="replace")))


async def test_key_updates_between_echoes_are_answered_and_nothing_is_lost(
    certs: Certs, tmp_path: Path
) -> None:
    messages = tmp_path / "messages.txt"
    async with gateway_with(certs, tmp_path, backends={"/plain": plain_echo}) as gw:
        with trio.fail_after(40):
            async with s_client(gw.port, certs, "-tls1_3", "-crlf", "-quiet", "-no_ign_eof", "-msg", "-msgfile", str(messages)) as client:
                await client.write(upgrade_lines("/plain"))
                await client.wait_out(lambda out: b"HTTP/1.1 101 " in out, "the 101")
                expected = b""
                requested = 0
                for round_ in range(4):
                    for letter in ("K", "k"):
                        for n in range(3):
                            line = f"round {round_} before {letter} line {n}\n".encode()
                            await client.write(line)
                            expected += line.replace(b"\n", b"\r\n")
                            await client.wait_out(ends_with(expected), f"the echo of {line!r}")
                        await client.write(f"{letter}\n".encode())
                        requested += letter == "K"
                        await client.wait_err(b"KEYUPDATE", 2 * round_ + (letter == "k") + 1)
                for n in range(3):
                    line = f"last line {n}\n".encode()
                    await client.write(line)
                    expected += line.replace(b"\n", b"\r\n")
                await client.wait_out(ends_with(expected), "the last echoes")
                await client.close_stdin()
                assert await client.wait_exit() == 0
    assert client.body() == expected
    # Every update_requested got the gateway's own KeyUpdate back (RFC 8446 4.6.3).
    assert key_updates_received(messages) >= requested, messages.read_text()[-3000:]


STREAM = 24 * 1024 * 1024


def stream_bytes(size: int) -> bytes:
    return hashlib.shake_256(b"stream").digest(size)


async def streams_then_echoes(stream: trio.SocketStream) -> None:
    """Passthrough backend: 101, then STREAM bytes to the client, then echo."""
    try:
        head, _ = await read_head(stream)
        await stream.send_all(switching_protocols(head))
        data = stream_bytes(STREAM)
        for start in range(0, STREAM, 1 << 16):
            await stream.send_all(data[start : start + (1 << 16)])
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        pass


async def test_key_update_while_the_backend_streams_to_the_client(certs: Certs, tmp_path: Path) -> None:
    """A KeyUpdate (update requested) arrives while the gateway is writing a large
    stream to the client: a read that must write in the middle of writes. Every byte
    of the stream arrives in order, the update is answered, echo works after it."""
    messages = tmp_path / "messages.txt"
    async with gateway_with(certs, tmp_path, backends={"/stream": streams_then_echoes}) as gw:
        with trio.fail_after(50):
            async with s_client(gw.port, certs, "-tls1_3", "-crlf", "-quiet", "-no_ign_eof", "-msg", "-msgfile", str(messages)) as client:
                await client.write(upgrade_lines("/stream"))
                await client.wait_out(lambda out: b"HTTP/1.1 101 " in out, "the 101")
                for fraction in (8, 4, 2):
                    await client.wait_out(longer_than(STREAM // fraction), f"1/{fraction} of the stream")
                    await client.write(b"K\n")
                    await client.wait_err(b"KEYUPDATE", 4 - fraction.bit_length() + 1)
                await client.wait_out(lambda out: len(client.body()) >= STREAM, "the whole stream")
                await client.write(b"after the stream\n")
                await client.wait_out(ends_with(b"after the stream\r\n"), "the echo")
                await client.close_stdin()
                assert await client.wait_exit() == 0
    body = client.body()
    assert len(body) == STREAM + len(b"after the stream\r\n")
    assert hashlib.sha256(body[:STREAM]).digest() == hashlib.sha256(stream_bytes(STREAM)).digest()
    assert key_updates_received(messages) >= 3, messages.read_text()[-3000:]


# ---------------------------------------------------------------------------
# The real daemon: clients that sit spliced
# ---------------------------------------------------------------------------


def daemon_config(ports: dict[str, int], *, gateway: str = "", extra_routes: tuple[str, ...] = ()) -> str:
    """``gatewayd run`` configuration (certificate from the ``pki`` fixture, beside it)."""
    routes = {"/echo": f"ws://127.0.0.1:{ports['echo']}/", "/bridge": f"tcp://127.0.0.1:{ports['bridge']}"}
    routes.update({path: f"ws://127.0.0.1:{ports['echo']}/" for path in extra_routes})
    return textwrap.dedent(
        f"""
        [gateway]
        idle_timeout = 0
        {gateway}

        [[listener]]
        address = "127.0.0.1:0"

        [[host]]
        names = ["localhost"]
        certificate = "localhost.pem"
        private_key = "localhost.key"
        default = true
        """
    ) + "".join(f'\n[[host.route]]\npath = "{p}"\nbackend = "{b}"\n' for p, b in routes.items())


class Spliced:
    """A client past the 101: passthrough (the raw echo returns our frames byte for byte)
    or bridge (wsproto parses the gateway's frames)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], bridge: bool, rest: bytes) -> None:
        self.stream = stream
        self.bridge = bridge
        self.ws = Connection(ConnectionType.CLIENT)
        self.raw = bytearray()
        self.data = bytearray()
        self.events: list[Event] = []
        self._take(rest)

    @classmethod
    async def open(
        cls, port: int, context: ssl.SSLContext, path: str, *, rcvbuf: int = 0, greeting: bool = True
    ) -> Spliced:
        with trio.fail_after(STEP):
            sock = trio.socket.socket()
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname="localhost")
            await stream.do_handshake()
            await stream.send_all(upgrade_request(path, "localhost"))
            head, rest = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101 "), head
            client = cls(stream, path == "/bridge", rest)
            if greeting:
                await client.expect(TCP_GREETING if client.bridge else GREETING)
            return client

    def _take(self, data: bytes | bytearray, eof: bool = False) -> None:
        if not self.bridge:
            self.data += data
            return
        if not data and not eof:
            return
        self.ws.receive_data(bytes(data) if data else None)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.data += event.data
            else:
                self.events.append(event)

    async def _receive(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self._take(data, eof=not data)
        return bool(data)

    async def expect(self, payload: bytes) -> None:
        """Until the next ``len(payload)`` bytes have come back; they must be ``payload``."""
        with trio.fail_after(STEP):
            while len(self.data) < len(payload):
                assert await self._receive(), f"EOF after {bytes(self.data)!r}"
        got, self.data = bytes(self.data[: len(payload)]), self.data[len(payload) :]
        assert got == payload

    def frame(self, payload: bytes) -> bytes:
        return self.ws.send(BytesMessage(data=payload))

    async def echo(self, payload: bytes) -> None:
        frame = self.frame(payload)
        with trio.fail_after(STEP):
            await self.stream.send_all(frame)
        await self.expect(payload if self.bridge else frame)

    async def close(self) -> None:
        """The client ends: a close handshake (bridge) or close_notify (passthrough)."""
        with trio.fail_after(STEP):
            if self.bridge:
                await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
                while not self.events:
                    assert await self._receive(), "EOF before the close answer"
                assert isinstance(self.events[0], CloseConnection) and self.events[0].code == 1000
                while await self._receive():
                    pass
            await trio.aclose_forcefully(self.stream) if self.bridge else await self.stream.aclose()

    async def wait_gateway_close(self) -> int | None:
        """The gateway ends the connection: returns the close code (bridge; answered) or None."""
        with trio.fail_after(STEP):
            code = None
            while True:
                open_ = await self._receive()
                if self.bridge and self.events and code is None:
                    event = self.events[0]
                    assert isinstance(event, CloseConnection), event
                    code = int(event.code)
                    with trio.move_on_after(1):
                        await self.stream.send_all(self.ws.send(event.response()))
                if not open_:
                    await trio.aclose_forcefully(self.stream)
                    return code


ACCESS_LINE = re.compile(r"gatewayd\.access: .*? path=(\S+) .*? status=(\S+) bytes_in=(\d+) bytes_out=(\d+) .*?end=(\S+)")


def access_ends(log: str) -> dict[tuple[str, str], int]:
    """(path, end) -> how many access lines of upgraded connections say so."""
    counts: dict[tuple[str, str], int] = {}
    for match in ACCESS_LINE.finditer(log):
        if match.group(2) == "101":
            key = (match.group(1), match.group(5))
            counts[key] = counts.get(key, 0) + 1
    return counts


async def wait_access_ends(service: Service, expected: dict[tuple[str, str], int], since: int = 0) -> None:
    with trio.move_on_after(STEP):
        while access_ends(service.log[since:]) != expected:
            await trio.sleep(0.05)
    assert access_ends(service.log[since:]) == expected, service.log[-5000:]


async def open_many(port: int, context: ssl.SSLContext, path: str, count: int) -> list[Spliced]:
    clients: list[Spliced] = []
    limit = trio.CapacityLimiter(10)

    async def one() -> None:
        async with limit:
            clients.append(await Spliced.open(port, context, path))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return clients


async def echo_all(clients: list[Spliced], tag: bytes) -> None:
    async with trio.open_nursery() as nursery:
        for number, client in enumerate(clients):
            nursery.start_soon(client.echo, tag + b" %d" % number)


MANY = 50


@asynccontextmanager
async def echo_backends() -> AsyncIterator[dict[str, int]]:
    async with raw_backend(raw_echo) as echo, raw_backend(tcp_echo) as bridge:
        yield {"echo": echo, "bridge": bridge}


# ---------------------------------------------------------------------------
# 4. Reload and drain while many connections sit spliced
# ---------------------------------------------------------------------------


async def test_sighup_leaves_50_passthrough_and_50_bridged_connections_working(
    tmp_path: Path, pki: Pki
) -> None:
    async with echo_backends() as ports, running(tmp_path, daemon_config(ports)) as service:
        with trio.fail_after(50):
            clients = await open_many(service.port, pki.context, "/echo", MANY)
            clients += await open_many(service.port, pki.context, "/bridge", MANY)
            await echo_all(clients, b"before the reload")
            logged = await service.reload(daemon_config(ports, extra_routes=("/new",)))
            assert "reload succeeded" in logged, logged
            await echo_all(clients, b"after the reload")
            await trio.sleep(0.5)
            await echo_all(clients, b"a while after the reload")
            new = await Spliced.open(service.port, pki.context, "/new")
            await new.echo(b"on the new route")
            async with trio.open_nursery() as nursery:
                for client in [*clients, new]:
                    nursery.start_soon(client.close)
            await wait_access_ends(
                service, {("/echo", "client_close"): MANY, ("/bridge", "client_close"): MANY, ("/new", "client_close"): 1},
            )
            assert service.alive


async def test_sigterm_drains_50_spliced_connections_within_shutdown_timeout(
    tmp_path: Path, pki: Pki
) -> None:
    """During the drain every connection still echoes; those that close themselves are
    client_close; the rest are closed at shutdown_timeout (bridge: close 1001 first)
    and logged as shutdown; the daemon exits 0."""
    shutdown_timeout = 2.0
    gateway = f"shutdown_timeout = {shutdown_timeout}"
    async with echo_backends() as ports, running(tmp_path, daemon_config(ports, gateway=gateway)) as service:
        with trio.fail_after(50):
            passthrough = await open_many(service.port, pki.context, "/echo", MANY)
            bridged = await open_many(service.port, pki.context, "/bridge", MANY)
            clients = passthrough + bridged
            await echo_all(clients, b"before the drain")
            mark = len(service.log)
            service.signal(signal.SIGTERM)
            await service.wait_log(rf"{2 * MANY} connection\(s\) may drain", since=mark)
            leaving = passthrough[: MANY // 2] + bridged[: MANY // 2]
            staying = passthrough[MANY // 2 :] + bridged[MANY // 2 :]
            await echo_all(clients, b"during the drain")
            codes: list[int | None] = []

            async def stay(client: Spliced) -> None:
                codes.append(await client.wait_gateway_close())

            with trio.fail_after(shutdown_timeout + STEP):
                async with trio.open_nursery() as nursery:
                    for client in leaving:
                        nursery.start_soon(client.close)
                    for client in staying:
                        nursery.start_soon(stay, client)
            assert await service.wait_exit(STEP) == 0, service.child.describe()
    assert sorted(codes, key=str) == sorted([None] * (MANY // 2) + [1001] * (MANY // 2), key=str)
    assert access_ends(service.log[mark:]) == {
        ("/echo", "client_close"): MANY // 2,
        ("/echo", "shutdown"): MANY // 2,
        ("/bridge", "client_close"): MANY // 2,
        ("/bridge", "shutdown"): MANY // 2,
    }, service.log[mark:][-5000:]


# ---------------------------------------------------------------------------
# 5. A paused direction does not spin
# ---------------------------------------------------------------------------

#: CPU seconds (utime + stime of the daemon) allowed over MEASURE seconds of wall
#: time with every spliced direction stalled: a direction that spins (a
#: level-triggered readiness it cannot act on) burns a whole core, ~MEASURE.
STALLED_CPU = 0.15
#: The same while the other direction carries FLOW_MESSAGES small messages.
FLOWING_CPU = 0.3
MEASURE = 2.0
STALLED_CONNECTIONS = 8
FLOW_MESSAGES = 20
BLOCK = 1 << 16


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()   # fields 3.. of proc(5)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Flood:
    """Sends as fast as the other side takes it; ``last`` is when a send last completed."""

    sent: int = 0
    last: float = field(default_factory=time.monotonic)

    async def run(self, send: Callable[[], Awaitable[int]]) -> None:
        try:
            while True:
                self.sent += await send()
                self.last = time.monotonic()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@dataclass
class StallBackend:
    """Passthrough (answers the upgrade first) or bridge service that floods and/or reads.

    ``flood``: once ``go`` is set, it sends until its writes block; ``read``: it reads
    and counts, else it never reads at all. (The flood waits for ``go``, set when every
    client has its 101: a flood right behind the 101 would block the gateway's write of
    the 101 itself, before the splice even starts.)
    """

    passthrough: bool
    flood: bool
    read: bool
    floods: list[Flood] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    streams: list[trio.SocketStream] = field(default_factory=list)
    ended: int = 0
    go: trio.Event = field(default_factory=trio.Event)

    async def handler(self, stream: trio.SocketStream) -> None:
        try:
            if self.passthrough:
                head, _ = await read_head(stream)
                await stream.send_all(switching_protocols(head))
            self.streams.append(stream)
            number = len(self.received)
            self.received.append(0)
            async with trio.open_nursery() as nursery:
                if self.flood:
                    flood = Flood()
                    self.floods.append(flood)
                    block = b"b" * BLOCK

                    async def send() -> int:
                        await self.go.wait()
                        await stream.send_all(block)
                        return BLOCK

                    nursery.start_soon(flood.run, send)
                if self.read:
                    try:
                        while data := await stream.receive_some(65536):
                            self.received[number] += len(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass   # the end of the test (the child killed)
                else:
                    await trio.sleep_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
        finally:
            self.ended += 1


async def wait_stalled(floods: list[Flood], count: int) -> None:
    """Until ``count`` floods exist and none has progressed for a second (all blocked)."""
    with trio.fail_after(30):
        while len(floods) < count or any(time.monotonic() - f.last < 1.0 for f in floods):
            await trio.sleep(0.1)


async def measure(pid: int, during: Callable[[], Awaitable[None]] | None = None) -> float:
    before = cpu_seconds(pid)
    async with trio.open_nursery() as nursery:
        if during is not None:
            nursery.start_soon(during)
        await trio.sleep(MEASURE)
    return cpu_seconds(pid) - before


async def flow_up(pid: int, clients: list[Spliced], backend: StallBackend, passthrough: bool) -> float:
    """client -> backend carries FLOW_MESSAGES per connection while backend -> client is
    stalled; returns the CPU seconds used meanwhile."""
    frame = clients[0].frame(b"m" * 100)

    async def flow() -> None:
        for _ in range(FLOW_MESSAGES):
            for client in clients:
                await client.stream.send_all(frame)
            await trio.sleep(MEASURE / FLOW_MESSAGES / 2)

    used = await measure(pid, flow)
    # Passthrough: the frames as sent; bridge: their payloads.
    each = FLOW_MESSAGES * (len(frame) if passthrough else 100)
    with trio.fail_after(STEP):
        while sum(backend.received) < len(clients) * each:
            await trio.sleep(0.05)
    assert backend.received == [each] * len(clients)
    return used


async def flow_down(pid: int, clients: list[Spliced], backend: StallBackend) -> float:
    """backend -> client carries FLOW_MESSAGES per connection while client -> backend is
    stalled; returns the CPU seconds used meanwhile."""
    message = b"d" * 100

    async def drip() -> None:
        for _ in range(FLOW_MESSAGES):
            for stream in backend.streams:
                await stream.send_all(message)
            await trio.sleep(MEASURE / FLOW_MESSAGES / 2)

    async def flow() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            for client in clients:
                nursery.start_soon(client.expect, message * FLOW_MESSAGES)

    return await measure(pid, flow)


def start_floods(nursery: trio.Nursery, clients: list[Spliced]) -> list[Flood]:
    """Each client sends BLOCK-byte messages for as long as the gateway takes them."""
    floods = []
    for client in clients:
        flood = Flood()
        floods.append(flood)
        frame = client.frame(b"c" * BLOCK)

        async def send(client: Spliced = client, frame: bytes = frame) -> int:
            await client.stream.send_all(frame)
            return len(frame)

        nursery.start_soon(flood.run, send)
    return floods


MODES = ["both-stalled", "client-stops-reading", "backend-stops-reading"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ["passthrough", "bridge"])
async def test_stalled_directions_cost_no_cpu(tmp_path: Path, pki: Pki, route: str, mode: str) -> None:
    """Fill the stalled direction(s) until every write blocks (clients with a 4 KiB
    receive buffer that never read, backends that never read), then the daemon's CPU
    time over MEASURE s stays near zero; in the single-direction modes the other
    direction carries messages meanwhile, and they all arrive."""
    passthrough = route == "passthrough"
    # The backend floods (its writes to block) unless it is the stalled reader alone;
    # it reads only when the client -> backend direction is to flow.
    backend = StallBackend(passthrough, flood=mode != "backend-stops-reading", read=mode == "client-stops-reading")
    async with raw_backend(backend.handler) as port:
        ports = {"echo": port, "bridge": port}
        async with running(tmp_path, daemon_config(ports)) as service:
            pid = service.child.process.pid
            path = "/echo" if passthrough else "/bridge"
            async with trio.open_nursery() as nursery:
                clients = [
                    await Spliced.open(service.port, pki.context, path, rcvbuf=4096, greeting=False)
                    for _ in range(STALLED_CONNECTIONS)
                ]
                backend.go.set()
                # The client floods (the backend's reads stall) unless it is the stalled reader alone.
                floods = start_floods(nursery, clients) if mode != "client-stops-reading" else []
                await wait_stalled(floods, len(floods))
                await wait_stalled(backend.floods, STALLED_CONNECTIONS if backend.flood else 0)
                floods += backend.floods
                before = [f.sent for f in floods]
                if mode == "both-stalled":
                    used, bound = await measure(pid), STALLED_CPU
                elif mode == "client-stops-reading":
                    used, bound = await flow_up(pid, clients, backend, passthrough), FLOWING_CPU
                else:
                    used, bound = await flow_down(pid, clients, backend), FLOWING_CPU
                # The stalled directions stayed stalled, the connections open.
                assert [f.sent for f in floods] == before
                assert backend.ended == 0 and service.alive
                assert "gatewayd.access" not in service.log, service.log[-3000:]   # none ended
                nursery.cancel_scope.cancel()
    assert used < bound, f"{used:.2f}s of CPU in {MEASURE}s with the {route} directions stalled ({mode})"


# ---------------------------------------------------------------------------
# 6. Timeouts and half-close on connections that have been quiet a while
# ---------------------------------------------------------------------------


async def open_in_process(gw: Running, certs: Certs, route: str) -> Spliced:
    return await Spliced.open(gw.port, certs.client_context(), "/echo" if route == "passthrough" else "/bridge")


@pytest.mark.parametrize("route", ["passthrough", "bridge"])
async def test_idle_timeout_ends_a_spliced_connection_once_it_goes_quiet(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    """Echoes spaced under idle_timeout keep it open for several idle_timeouts; once
    quiet it is closed (bridge: 1001 first) no sooner than idle_timeout, logged idle_timeout."""
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    idle = 0.8
    async with gateway_with(certs, tmp_path, gateway=f"idle_timeout = {idle}") as gw:
        with trio.fail_after(30):
            client = await open_in_process(gw, certs, route)
            for number in range(8):   # 8 x 0.3 s: three idle_timeouts with traffic
                await client.echo(b"keep alive %d" % number)
                await trio.sleep(0.3)
            await trio.sleep(0.2)
            quiet = trio.current_time() - 0.5   # (the last echo was about 0.5 s ago)
            code = await client.wait_gateway_close()
            waited = trio.current_time() - quiet
            (access,) = await wait_upgraded_access(caplog)
    assert code == (1001 if route == "bridge" else None)
    assert waited >= idle * 0.9, waited
    assert access["end"] == "idle_timeout", access


@pytest.mark.parametrize("route", ["passthrough", "bridge"])
async def test_max_connection_age_retires_a_quiet_spliced_connection(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    async with gateway_with(certs, tmp_path, gateway="max_connection_age = 1.0") as gw:
        with trio.fail_after(30):
            client = await open_in_process(gw, certs, route)
            await client.echo(b"once")
            await trio.sleep(0.3)
            await client.echo(b"twice")
            code = await client.wait_gateway_close()
            (access,) = await wait_upgraded_access(caplog)
    assert code == (1001 if route == "bridge" else None)
    assert access["end"] == "max_age", access


@dataclass
class TrailerBackend:
    """101, echo until the client's EOF, then TRAILER, then close."""

    eof: trio.Event = field(default_factory=trio.Event)

    async def handler(self, stream: trio.SocketStream) -> None:
        try:
            head, rest = await read_head(stream)
            await stream.send_all(switching_protocols(head) + rest)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            self.eof.set()
            await stream.send_all(TRAILER)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass


TRAILER = b"sent after the client's EOF"


async def test_half_close_after_a_quiet_while_still_delivers_the_backends_rest(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spliced connection quiet for a while: the client's close_notify reaches the
    backend as EOF, what the backend sends after it still reaches the client, then
    the backend's FIN ends it as client_close; the byte counts are exact."""
    caplog.set_level(logging.INFO, logger="gatewayd.access")
    backend = TrailerBackend()
    async with gateway_with(certs, tmp_path, backends={"/trailer": backend.handler}) as gw:
        with trio.fail_after(30):
            client = await MemoryClient.connect(gw.port, certs.client_context())
            await client.handshake()
            request = upgrade_request("/trailer", "localhost")
            frame = client_frame(b"before the quiet while")
            client.write(request)
            await client.flush()
            await client.receive_until(lambda data: b"\r\n\r\n" in data)
            head = bytes(client.received)
            assert head.startswith(b"HTTP/1.1 101 ") and head.endswith(b"\r\n\r\n"), head
            client.write(frame)
            await client.flush()
            await client.receive_until(lambda data: data.endswith(frame))
            await trio.sleep(1.5)
            await client.close_notify()
            with trio.fail_after(STEP):
                await backend.eof.wait()
            while await client.receive():
                pass
            (access,) = await wait_upgraded_access(caplog)
            client.aclose()
    assert bytes(client.received) == head + frame + TRAILER
    assert access["end"] == "client_close", access
    assert (access["bytes_in"], access["bytes_out"]) == (client.sent_plaintext, len(client.received)), access
